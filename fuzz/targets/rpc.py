"""targets of `pydstack.rpc`: prpc's JSON and query-string decoding of request messages."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Sequence

from google.protobuf.message import Message

from fuzz import mutators as m
from fuzz.harness import Target
from pydstack.rpc.guard import Refusal, RequestGuard, body_mode, normalize_origin, split_host
from pydstack.rpc.json_codec import (
    CodecError,
    json_to_message,
    message_to_json,
    message_to_obj,
    query_to_message,
)
from pydstack.rpc.proto import agent_rpc_pb2 as agent
from pydstack.rpc.proto import guest_api_pb2 as guest
from pydstack.rpc.proto import host_api_pb2 as host
from pydstack.rpc.proto import kms_rpc_pb2 as kms
from pydstack.rpc.proto import vmm_rpc_pb2 as vmm

#: message types with every field kind the codec handles: nested, repeated, optional, bytes,
#: bool, 32- and 64-bit integers, signed and unsigned
MESSAGES: tuple[type[Message], ...] = (
    vmm.VmConfiguration,
    vmm.UpdateVmRequest,
    kms.SignCertRequest,
    kms.GetMetaResponse,
    agent.GetTlsKeyArgs,
    host.TdExtendRequest,
    guest.Container,
)
#: the GET form reads scalars only: the four of MESSAGES that hold every scalar kind between
#: them (bool with and without presence, uint32 with and without, uint64, int64, bytes,
#: string, repeated string, and message fields a query cannot set); each type parses the whole
#: query again, so the other three only slowed the fuzzer
QUERY_MESSAGES: tuple[type[Message], ...] = (
    vmm.VmConfiguration,
    vmm.UpdateVmRequest,
    kms.GetMetaResponse,
    guest.Container,
)


def _json(data: bytes) -> None:
    for cls in MESSAGES:
        try:
            msg = json_to_message(data, cls())
        except CodecError:
            continue
        # the json form is a fixed point (messages may differ in presence only: an unset
        # message field is written as an object of defaults, which reads back as set)
        text = message_to_json(msg)
        again = message_to_json(json_to_message(text, cls()))
        assert again == text, f"{cls.__name__} does not survive its own json form"


def _query(data: bytes) -> None:
    query = data.decode("utf-8", "surrogateescape")
    for cls in QUERY_MESSAGES:
        try:
            msg = query_to_message(query, cls())
        except CodecError:
            continue
        message_to_obj(msg)


def _samples() -> list[tuple[str, dict[str, object]]]:
    return [
        (
            "vm-configuration",
            {
                "name": "app",
                "image": "dstack-0.5",
                "compose_file": "{}",
                "vcpu": 2,
                "memory": "2048",
                "ports": [{"protocol": "tcp", "host_port": 8080, "vm_port": 80}],
                "encrypted_env": "0xdeadbeef",
                "app_id": None,
                "gpus": {"gpus": [{"slot": "01:00.0"}], "attach_mode": "listed"},
                "kms_urls": ["https://kms"],
                "networking": {"mode": "bridge"},
                "networks": [{"mode": "user"}],
            },
        ),
        ("sign-cert", {"api_version": 2, "csr": "00ff", "signature": "AB", "vm_config": "{}"}),
        ("tls-key", {"subject": "s", "alt_names": ["a"], "not_before": "18446744073709551615"}),
        ("meta", {"chain_id": 1, "bootstrap_info": {"ca_pubkey": "01"}, "is_dev": True}),
        ("container", {"id": "c", "created": -5, "names": ["x"]}),
        ("td-extend", {"rtmr": 3, "event": "e", "payload": "", "version": 2}),
    ]


FIELD_NAMES = tuple(f'"{f.name}"'.encode() for cls in MESSAGES for f in cls.DESCRIPTOR.fields)
FIELD_TOKENS = (
    *FIELD_NAMES,
    b'"0x',
    b"18446744073709551616",
    b"-9223372036854775809",
    b"1e3",
    b"null",
)

PRPC_JSON = Target(
    name="prpc_json",
    doc="`rpc/json_codec.py::json_to_message` over seven message types (nested, repeated, "
    "optional, bytes, 64-bit), and that a decoded message survives `message_to_json`",
    make=lambda: _json,
    allowed=(),
    seeds=lambda: [(label, json.dumps(doc).encode()) for label, doc in _samples()],
    mutators=m.JSON,
    tokens=FIELD_TOKENS,
    max_len=16 * 1024,
    calls=21,
)


def _query_seeds() -> list[tuple[str, bytes]]:
    out = []
    for label, doc in _samples():
        pairs: list[tuple[str, str]] = []
        for k, v in doc.items():
            for item in v if isinstance(v, list) else [v]:
                if not isinstance(item, dict):
                    pairs.append((k + ("[]" if isinstance(v, list) else ""), json.dumps(item)))
        out.append((label, urllib.parse.urlencode(pairs).encode()))
    out.append(("bools", b"brief=true&stopped=1&hugepages=&no_tee=0&update_ports=false"))
    return out


PRPC_QUERY = Target(
    name="prpc_query",
    doc="`rpc/json_codec.py::query_to_message` (the GET form) over four of the same message "
    "types, which hold every scalar kind",
    make=lambda: _query,
    allowed=(),
    seeds=_query_seeds,
    mutators=(*m.QUERY, m.reencode),
    tokens=(*tuple(t.strip(b'"') + b"=" for t in FIELD_TOKENS[:40]), b"[]=", b"&", b"%"),
    max_len=4 * 1024,  # query strings are short: longer ones only slow the fuzzer
    calls=4,
)

# -- the request guard: Host, Origin, Sec-Fetch-Site and Content-Type of every request -------


class _Request:
    """a request as the guard reads it: header names lower-case, over TCP, plain http."""

    method = "POST"
    scheme = "http"
    transport = None
    is_unix = False

    def __init__(self, headers: dict[str, str], query: dict[str, str]) -> None:
        self.headers, self.query = headers, query


def _guard() -> Callable[[bytes], None]:
    guard = RequestGuard(
        allowed_hosts=frozenset({"vmm.example", "*.lab.example"}),
        allowed_origins=frozenset({"https://ui.example:8443"}),
    )

    def run(data: bytes) -> None:
        # the two ways the servers decode a head: latin-1 (the lean server) and utf-8 with
        # surrogateescape (aiohttp)
        for text in (data.decode("latin-1"), data.decode("utf-8", "surrogateescape")):
            headers: dict[str, str] = {}
            for line in text.split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers.setdefault(name.strip().lower(), value.strip())
            refusal = guard.check(_Request(headers, {"json": ""} if "json" in text else {}))
            host = headers.get("host")
            if refusal is None and host is not None:
                parsed = split_host(host)
                assert parsed is not None and guard.host_allowed(parsed[0])
                # one spelling: a port read is the ASCII digits it was written as
                port = parsed[1]
                assert port is None or (1 <= port <= 65535 and host.endswith(str(port)))
            assert refusal is None or (
                isinstance(refusal, Refusal) and refusal.status in (400, 403)
            ), refusal
            mode = body_mode(_Request(headers, {}))
            assert isinstance(mode, str) or mode.status == 415
            origin = normalize_origin(headers.get("origin", ""))
            assert origin is None or origin.isascii(), origin

    return run


def _guard_seeds() -> list[tuple[str, bytes]]:
    return [
        ("local", b"Host: localhost:8080\r\nContent-Type: application/json\r\n"),
        ("v6", b"Host: [::1]:80\r\nOrigin: http://[::1]:80\r\nSec-Fetch-Site: same-origin\r\n"),
        ("ui", b"Host: vmm.example\r\nOrigin: https://ui.example:8443\r\n"),
        ("wild", b"Host: a.lab.example:443\r\nContent-Type: application/x-protobuf\r\n"),
        ("cross", b"Host: 10.0.0.1\r\nOrigin: null\r\nSec-Fetch-Site: cross-site\r\n"),
    ]


HTTP_GUARD = Target(
    name="http_guard",
    doc="`rpc/guard.py::RequestGuard.check` and `body_mode` on headers decoded as both servers "
    "decode them; a request that passes names an allowed host and a port of one spelling",
    make=_guard,
    allowed=(),
    seeds=_guard_seeds,
    mutators=(*m.TEXT, m.truncate),
    tokens=(
        b"Host: ",
        b"Origin: http://",
        b"Sec-Fetch-Site: ",
        b"Content-Type: ",
        b"\xb2",
        b"\xd9\xa8",
        b"[::1]",
        b":",
        b"\r\n",
    ),
    max_len=4096,
    calls=2,
)

TARGETS: Sequence[Target] = (PRPC_JSON, PRPC_QUERY, HTTP_GUARD)
