"""targets of what a CVM reads from its host: `.instance_info`, `.appkeys.json` and the answers
of the host's TD."""

from __future__ import annotations

import json
from collections.abc import Sequence

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.attest.eventlog import event_log_to_json
from pydstack.guest.appkeys import AppKeys, AppKeysError
from pydstack.guest.instance import InstanceInfo, InstanceInfoError
from pydstack.tee.hosttd import HostTdError, parse_event_log, parse_quote_response, parse_response


def _instance_info(data: bytes) -> None:
    for raw in (data, c.text(data)):
        info = c.refusing((InstanceInfoError,), InstanceInfo.from_json, raw)
        if info is not None:
            assert InstanceInfo.from_json(info.to_json()) == info, "instance info round trip"


INSTANCE_INFO = Target(
    name="instance_info",
    doc="`guest/instance.py::InstanceInfo.from_json` (bytes and str) and its round trip",
    make=lambda: _instance_info,
    allowed=(),
    seeds=lambda: [
        ("full", InstanceInfo(b"\x01" * 32, b"\x02" * 20, b"\x03" * 20).to_json().encode()),
        ("prefixed", b'{"instance_id_seed": "0x00ff", "app_id": null}'),
        ("empty", b""),
    ],
    mutators=m.JSON,
    tokens=(b'"instance_id_seed"', b'"instance_id"', b'"app_id"', b'"0x'),
    max_len=8 * 1024,
    calls=4,
)


def _appkeys(data: bytes) -> None:
    for raw in (data, c.text(data)):
        keys = c.refusing((AppKeysError,), AppKeys.from_json, raw)
        if keys is not None:
            _ = keys.key_provider.name, keys.key_provider.key_pem
            assert AppKeys.from_json(keys.to_json()) == keys, "appkeys round trip"


APPKEYS = Target(
    name="appkeys",
    doc="`guest/appkeys.py::AppKeys.from_json` (bytes and str), the key provider and a round "
    "trip through `to_json`",
    make=lambda: _appkeys,
    allowed=(),
    seeds=lambda: [
        ("simulator", c.vector("dstack/simulator_appkeys.json")),
        (
            "kms",
            json.dumps(
                {
                    "disk_crypt_key": "00" * 32,
                    "env_crypt_key": "0x" + "11" * 32,
                    "k256_key": "22" * 32,
                    "k256_signature": "33" * 65,
                    "gateway_app_id": "gw",
                    "ca_cert": "-----BEGIN CERTIFICATE-----\n",
                    "key_provider": {"Kms": {"url": "https://kms", "pubkey": "aa"}},
                }
            ).encode(),
        ),
    ],
    mutators=m.JSON,
    tokens=tuple(
        f'"{k}"'.encode()
        for k in (
            "disk_crypt_key",
            "env_crypt_key",
            "k256_key",
            "k256_signature",
            "gateway_app_id",
            "ca_cert",
            "key_provider",
            "None",
            "Local",
            "Tpm",
            "Kms",
            "key",
            "mr",
            "pubkey",
            "url",
        )
    ),
    max_len=16 * 1024,
    calls=4,
)


def _hosttd(data: bytes) -> None:
    for method, status in (("GetQuote", 200), ("GetEventLog", 200), ("ExtendRtmr", 400)):
        resp = c.refusing((HostTdError,), parse_response, method, status, data)
        if resp is None:
            continue
        if method == "GetQuote":
            c.refusing((HostTdError,), parse_quote_response, resp)
        else:
            c.refusing((HostTdError,), parse_event_log, resp.get("event_log"))


def _hosttd_seeds() -> list[tuple[str, bytes]]:
    tdx = c.cvm().tdx
    log = event_log_to_json(tdx.event_log())
    return [
        ("quote", json.dumps({"quote": c.quote().hex(), "event_log": log}).encode()),
        ("event-log", json.dumps({"event_log": log}).encode()),
        ("error", b'{"error": "rtmr0 cannot be extended at runtime: only rtmr3"}'),
        ("empty", b"null"),
    ]


HOSTTD_RESPONSE = Target(
    name="hosttd_response",
    doc="`tee/hosttd.py`: `parse_response`, `parse_quote_response` and `parse_event_log`, the "
    "answers of the host's TD to a CVM (the host is not trusted)",
    make=lambda: _hosttd,
    allowed=(),
    seeds=_hosttd_seeds,
    mutators=m.JSON,
    tokens=(b'"quote"', b'"event_log"', b'"error"', b'"imr"', b'"digest"'),
    max_len=32 * 1024,
    calls=6,
)

TARGETS: Sequence[Target] = (INSTANCE_INFO, APPKEYS, HOSTTD_RESPONSE)
