"""JSON that peers send, read where it is not a request body: every site goes through the
bounded loader, so deep nesting is that site's own error (or its fallback), never a
RecursionError past its `except ValueError`. Each case raised RecursionError before."""

from __future__ import annotations

import base64
import json

import pytest

from pydstack.attest.evidence import key_provider_of
from pydstack.certbot.errors import DnsProviderError
from pydstack.certbot.rfc2136 import _decode_id
from pydstack.gateway.etcd import EtcdError, _json
from pydstack.gateway.policy import PortPolicyError, policy_from_agent_info
from pydstack.rpc.client import _error_message

DEEP = "[" * 5000


def test_a_deep_key_provider_event_is_no_key_provider() -> None:
    # the payload of an attestation's key-provider event, shown by the verifier's /verify
    assert key_provider_of(DEEP.encode()) is None
    assert key_provider_of(b'{"name": "kms", "id": "ab"}') == {"name": "kms", "id": "ab"}


def test_a_cvm_agent_info_with_deep_json_is_a_malformed_policy() -> None:
    # what a CVM's agent answers the gateway's port-policy fetch (the app writes app_compose)
    with pytest.raises(PortPolicyError, match="tcb_info is not json"):
        policy_from_agent_info({"tcb_info": DEEP})
    tcb = json.dumps({"app_compose": '{"port_policy": ' + DEEP + "}"})
    with pytest.raises(PortPolicyError, match="app_compose is not json"):
        policy_from_agent_info({"tcb_info": tcb})


def test_a_deep_error_body_from_a_server_is_shown_as_text() -> None:
    assert _error_message(DEEP.encode(), 500, True).startswith("http 500: [[[")


def test_deep_answers_from_etcd_and_made_up_record_ids_are_their_errors() -> None:
    with pytest.raises(EtcdError, match="not json"):
        _json(DEEP.encode())
    record_id = base64.urlsafe_b64encode(b"[" * 2000).decode().rstrip("=")
    with pytest.raises(DnsProviderError, match="not one this provider made"):
        _decode_id(record_id)
