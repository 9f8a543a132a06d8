"""the types the VMM writes and the guest reads: app-compose, host-share names, bounded JSON."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.errors import DstackError, InputError
from pydstack.types import hostshare as hs
from pydstack.types import jsonlimits
from pydstack.types.app_compose import AppCompose, AppComposeError
from tests.peak import allocation_peak

DOC = {"manifest_version": 2, "name": "a", "runner": "docker-compose", "kms_enabled": True}


def test_app_compose_reads_upstream_fields_and_hashes_the_bytes():
    raw = json.dumps({**DOC, "allowed_envs": ["X"], "init_script": "echo"}).encode()
    app = AppCompose.parse(raw)
    app.check_policy()
    assert app.compose_hash == hashlib.sha256(raw).digest()
    assert (app.name, app.key_provider, app.allowed_envs, app.init_scripts) == (
        "a", "kms", ["X"], ("echo",)
    )  # fmt: skip
    assert AppCompose.parse(json.dumps({**DOC, "key_provider": "none"})).key_provider == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest_version": 9}, "unsupported manifest_version"),
        ({"manifest_version": "x"}, "invalid manifest_version"),
        ({"runner": "sh"}, "unsupported runner"),
        ({"name": 5}, "no name"),
        ({"key_provider_id": "not-hex"}, "must be hex"),
        ({"init_script": ["a", "b"]}, "manifest_version 3"),
        ({"requirements": {}}, "manifest_version 3"),
    ],
)
def test_app_compose_policy_refusals(change, message):
    with pytest.raises(AppComposeError, match=message):
        AppCompose.parse(json.dumps({**DOC, **change})).check_policy()


@pytest.mark.parametrize("raw", [b"[]", b"{", b"\xff\xfe{\x00}\x00", '{"a": "\udfff"}'])
def test_app_compose_is_a_bounded_json_object(raw):
    with pytest.raises(AppComposeError):
        AppCompose.parse(raw)
    with pytest.raises(AppComposeError, match="too large"):
        AppCompose.parse(b"{}" + b" " * 100, max_bytes=10)


def test_every_domain_error_is_a_dstack_error():
    assert issubclass(AppComposeError, InputError) and issubclass(InputError, DstackError)
    assert issubclass(InputError, ValueError)  # old `except ValueError` still catches them


def test_host_share_names_and_caps_are_upstreams():
    caps = {f.name: f.max_size for f in hs.SHARED_FILES}
    assert caps[hs.APP_COMPOSE] == 50 * 1024 * 1024 and caps[hs.SYS_CONFIG] == 32 * 1024
    assert {hs.ENCRYPTED_ENV, hs.USER_CONFIG} == hs.SECRET_NAMES


def test_item_count_is_bounded_before_anything_is_built():
    body_len = len("[" + "{}," * 300_000 + "{}]")
    peak = allocation_peak(
        """
        from pydstack.types import jsonlimits
        body = ("[" + "{}," * 300_000 + "{}]").encode()
        """,
        """
        try:
            jsonlimits.loads(body)
            raise SystemExit("accepted")
        except ValueError as e:
            assert "more than" in str(e), e
        """,
    )
    assert peak < 3 * body_len  # the text once (decoded), never 300k dicts
    assert jsonlimits.loads(b"[1,2,3]", max_items=3) == [1, 2, 3]  # 2 commas + 1 bracket
