"""every fuzz target, by module, in the order `fuzz/run.py` runs them.

A worker imports only the module of its target (`load`), so only the pydstack modules that
target reaches are imported, and instrumented.
"""

from __future__ import annotations

import importlib

from fuzz.harness import Target

#: target name -> the module under fuzz.targets that defines it (in run order)
INDEX = {
    "quote": "attest",
    "quote_verify": "attest",
    "ccel": "attest",
    "eventlog_json": "attest",
    "runtime_event_line": "attest",
    "attestation": "attest",
    "app_info": "attest",
    "vm_config": "attest",
    "ratls_cert": "attest",
    "csr": "crypto",
    "envcrypt": "crypto",
    "prpc_json": "rpc",
    "prpc_query": "rpc",
    "http_guard": "rpc",
    "jsonlimits": "types",
    "yamllimits": "types",
    "compose": "types",
    "app_compose": "types",
    "sys_config": "types",
    "instance_info": "guest",
    "appkeys": "guest",
    "hosttd_response": "guest",
    "td_state": "vmm",
    "kms_sign_cert": "kms",
    "client_hello": "gateway",
    "proxy_header": "gateway",
    "gateway_http_head": "gateway",
    "app_address": "gateway",
    "register_answer": "gateway",
    "port_policy": "gateway",
}


def load(name: str) -> Target:
    """the target `name` (KeyError if there is none)."""
    module = importlib.import_module(f"fuzz.targets.{INDEX[name]}")
    found: dict[str, Target] = {t.name: t for t in module.TARGETS}
    return found[name]


def load_all() -> list[Target]:
    """every target, in run order."""
    return [load(name) for name in INDEX]
