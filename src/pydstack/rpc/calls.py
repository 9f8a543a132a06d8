"""the prpc call layer both HTTP servers share (:mod:`.server` on aiohttp, :mod:`.http1` the
lean one): services and their handlers, reading a call from a request and writing its answer,
peer credentials, Unix and TLS listener set-up.

It imports no HTTP stack, so a process serving only through http1 (the guest agent) does not
load aiohttp. The rules of a call are in :mod:`.server`'s docstring.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import re
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from pydstack.crypto.certload import load_cert_pem
from pydstack.errors import DstackError

from .guard import Refusal, RequestLike, body_mode, get_allowed
from .json_codec import CodecError, json_to_message, message_to_json, query_to_message
from .proto import prpc_pb2
from .unixpath import SocketPath

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 10 * 1024 * 1024
JSON_CT = "application/json"
PROTO_CT = "application/octet-stream"


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class CallContext:
    peer_cert: x509.Certificate | None
    peer_cred: PeerCred | None
    remote: str | None
    request: object | None = None


class Encoded:
    """a response encoded once: for an answer that does not change (Info within a boot, a key
    already derived), a handler returns this and the server writes the stored bytes."""

    __slots__ = ("_json", "_proto", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._json: dict[frozenset[str], bytes] = {}
        self._proto: bytes | None = None

    def json(self, omit_empty: frozenset[str]) -> bytes:
        out = self._json.get(omit_empty)
        if out is None:
            out = self._json[omit_empty] = message_to_json(self.message, omit_empty)
        return out

    def proto(self) -> bytes:
        if self._proto is None:
            self._proto = self.message.SerializeToString()
        return self._proto


Handler = Callable[[Any, CallContext], Awaitable[Message | Encoded]]


@dataclass
class PrpcService:
    """a protobuf service bound to an implementation object with one async method per rpc."""

    descriptor: ServiceDescriptor
    impl: object
    prefix: str = "/"
    trim: str = ""
    #: per method, response fields left out of JSON when empty (upstream's skip_serializing_if)
    omit_empty: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: methods callable with GET (read-only, returning no secrets); every other method is POST
    get_methods: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.get_methods) - set(self.descriptor.methods_by_name)
        if unknown:
            raise ValueError(f"get_methods names unknown methods: {', '.join(sorted(unknown))}")

    def bare_name(self, name: str) -> str:
        """the method name without the trim prefix."""
        return name[len(self.trim) :] if self.trim and name.startswith(self.trim) else name

    def method(self, name: str) -> tuple[Handler, type[Message], type[Message]] | None:
        name = self.bare_name(name)
        m = self.descriptor.methods_by_name.get(name)
        fn = getattr(self.impl, name, None) if m is not None else None
        if m is None or fn is None:
            return None
        return fn, GetMessageClass(m.input_type), GetMessageClass(m.output_type)


def wants_json(request: RequestLike) -> bool:
    """whether an error for this request is best written as JSON (a refused request included)."""
    if request.method != "POST":
        return True
    return body_mode(request) != "proto"  # JSON, or a refused type: then a readable error


@dataclass(frozen=True)
class Answer:
    """an HTTP answer, whichever server writes it."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] | None = None


#: the refusal of a call whose TLS client certificate cryptography cannot read
CLIENT_CERT_UNREADABLE = "the client certificate cannot be read: {}"


def error_answer(
    message: str, json_mode: bool, status: int = 400, headers: Mapping[str, str] | None = None
) -> Answer:
    """a prpc error: `{"error": msg}` (pretty-printed) in JSON mode, `ProtoError` otherwise."""
    if json_mode:
        body = json.dumps({"error": message}, indent=2).encode()
        return Answer(status, body, JSON_CT, headers)
    return Answer(
        status, prpc_pb2.ProtoError(message=message).SerializeToString(), PROTO_CT, headers
    )


def refused_answer(refusal: Refusal, request: RequestLike) -> Answer:
    headers = {"Allow": "POST"} if refusal.status == 405 else None
    return error_answer(refusal.message, wants_json(request), refusal.status, headers)


@dataclass(frozen=True)
class ResolvedCall:
    """a prpc call whose method exists and whose request may be decoded (before its body)."""

    name: str
    handler: Handler
    request_type: type[Message]
    json_mode: bool
    is_get: bool


def resolve_call(service: PrpcService, name: str, request: RequestLike) -> ResolvedCall | Answer:
    """the method `name` of `service` for this request, or the error answer (unknown method,
    GET of a method that is not read-only, a refused content type)."""
    is_get = request.method == "GET"
    mode_or_refusal = "json" if is_get else body_mode(request)
    found = service.method(name)
    if found is None:
        return error_answer(f"Service not found: {name}", mode_or_refusal != "proto")
    refusal: Refusal | None
    if is_get:
        refusal = get_allowed(service.bare_name(name), service.get_methods)
    else:
        refusal = mode_or_refusal if isinstance(mode_or_refusal, Refusal) else None
    if refusal is not None:
        log.info("refused %s %s: %s", request.method, name, refusal.message)
        return refused_answer(refusal, request)
    mode = mode_or_refusal
    fn, req_cls, _ = found
    return ResolvedCall(name, fn, req_cls, mode == "json", is_get)


async def invoke_call(
    service: PrpcService, call: ResolvedCall, body: bytes, query_string: str, ctx: CallContext
) -> Answer:
    """decode the request (the query string for GET, else `body`), run the handler, encode."""
    json_mode, name = call.json_mode, call.name
    try:
        req = call.request_type()
        if call.is_get:
            query_to_message(query_string, req)
        elif json_mode:
            json_to_message(body, req)
        else:
            req.ParseFromString(body)
    except (CodecError, DecodeError) as e:
        return error_answer(f"failed to decode request: {e}", json_mode)
    except Exception as e:  # a codec bug; the input is still what was bad
        log.warning("rpc %s: request decoding raised %s", name, type(e).__name__)
        return error_answer(f"failed to decode request: {type(e).__name__}", json_mode)
    try:
        resp = await call.handler(req, ctx)
    except DstackError as e:  # domain errors carry the message the caller should see
        return error_answer(str(e), json_mode)
    except Exception:  # a handler bug: logged, and the server keeps serving
        log.exception("rpc %s failed", name)
        return error_answer("internal error", json_mode, status=500)
    if json_mode:
        omit = service.omit_empty.get(service.bare_name(name), frozenset())
        if isinstance(resp, Encoded):
            return Answer(200, resp.json(omit), JSON_CT)
        return Answer(200, message_to_json(resp, omit), JSON_CT)
    return Answer(
        200, resp.proto() if isinstance(resp, Encoded) else resp.SerializeToString(), PROTO_CT
    )


def peer_cred(sock: Any) -> PeerCred | None:
    """the credentials of the process at the other end of a Unix socket (None for others)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return PeerCred(*struct.unpack("3i", raw))


async def unix_listener(
    path: str | Path,
    mode: int,
    group: str | int | None,
    start: Callable[[str], Awaitable[None]],
) -> None:
    """a Unix socket listener at `path`: a stale socket there is replaced, any other file refused
    with RuntimeError; `start(address)` binds it; then it is chmod-ed to `mode` and, when `group`
    (a name or gid) is given, chown-ed to that group. An unknown group is a ValueError, before
    anything binds."""
    gid = _gid(group)
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"refusing to replace non-socket file {path}")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    with SocketPath(path) as addr:
        await start(addr.address)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)


def parse_socket_mode(value: object) -> int:
    """a Unix socket's permission bits from config: an octal string ("0660", "660", "0o660") or
    an int (TOML's 0o660); ValueError for anything else or bits outside 0o777."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"socket mode {value!r} is not an octal number like 0660")
        mode = int(text, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(f'socket mode must be an octal string like "0660", got {value!r}')
    if not 0 <= mode <= 0o777:
        raise ValueError(
            f'socket mode {value!r} is outside 0o777 (write it in octal: 0o660 or "0660")'
        )
    return mode


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r} for the socket") from None


def dns_names(cert_pem: str) -> list[str]:
    """the DNS subject alternative names of the first certificate in `cert_pem`."""
    cert = load_cert_pem(cert_pem)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    names = san.value.get_values_for_type(x509.DNSName)  # type: ignore[attr-defined]
    return [n for n in names if re.fullmatch(r"(\*\.)?[A-Za-z0-9._-]+", n) and n.strip("*.")]


def server_ssl_context(
    cert_pem: str,
    key_pem: str,
    client_ca_pem: str | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as d:
        cert_file = Path(d) / "cert.pem"
        key_file = Path(d) / "key.pem"
        cert_file.write_text(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        # no session tickets where clients prove who they are: a resumed session would skip the
        # certificate (an RA-TLS one carries a fresh attestation each time), and each ticket
        # made copies the session through DER, client certificate and its quote included
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
    elif require_client_cert:
        raise ValueError("requiring client certificates needs a client ca")
    return ctx
