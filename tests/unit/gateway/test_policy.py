"""port policies: parsing, precedence and fail-closed checks."""

from __future__ import annotations

import json

import pytest

from pydstack.gateway.policy import (
    MAX_PORTS,
    OPEN_POLICY,
    PolicySource,
    PortPolicy,
    PortPolicyError,
    Verdict,
    check_port,
    effective_policy,
    policy_from_agent_info,
)

RESTRICT = PortPolicy.from_json({"restrict_mode": True, "ports": [{"port": 80, "pp": True}]})


def test_restricted_policy_allows_listed_ports_only() -> None:
    assert check_port(RESTRICT, 80) is Verdict.ALLOW
    assert check_port(RESTRICT, 81) is Verdict.DENY
    assert RESTRICT.pp(80) and not RESTRICT.pp(81)


def test_open_policy_allows_all_and_still_reads_pp() -> None:
    p = PortPolicy.from_json({"ports": [{"port": 9000, "pp": True}]})
    assert check_port(p, 1) is Verdict.ALLOW and p.pp(9000) and not p.pp(1)


def test_no_policy_fails_closed() -> None:
    assert check_port(None, 80) is Verdict.UNKNOWN


def test_empty_restricted_policy_denies_everything() -> None:
    deny_all = PortPolicy(restrict_mode=True, ports={})
    assert check_port(deny_all, 80) is Verdict.DENY


def test_admin_override_wins() -> None:
    admin = PortPolicy(restrict_mode=True, ports={})
    assert effective_policy(admin, OPEN_POLICY) == (admin, PolicySource.ADMIN)
    assert effective_policy(None, OPEN_POLICY) == (OPEN_POLICY, PolicySource.INSTANCE)
    assert effective_policy(None, None) == (None, PolicySource.NONE)


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"restrict_mode": "yes"},
        {"ports": {}},
        {"ports": [80]},
        {"ports": [{"port": 0}]},
        {"ports": [{"port": 65536}]},
        {"ports": [{"port": True}]},
        {"ports": [{"port": "80"}]},
        {"ports": [{"port": 80, "pp": 1}]},
        {"ports": [{"port": p} for p in range(1, MAX_PORTS + 2)]},
    ],
)
def test_malformed_policies(obj: object) -> None:
    with pytest.raises(PortPolicyError):
        PortPolicy.from_json(obj)


@pytest.mark.parametrize("port", ["8" * 100_000, [[1] * 50_000], 10**4000, -(10**30)])
def test_errors_do_not_grow_with_what_a_cvm_sent(port: object) -> None:
    """the port value went into the error message whole (repr of a 100 KB string)."""
    with pytest.raises(PortPolicyError) as e:
        PortPolicy.from_json({"ports": [{"port": port}]})
    assert len(str(e.value)) < 100, str(e.value)[:200]


def test_json_round_trip_and_duplicate_ports_merge_pp() -> None:
    p = PortPolicy.from_json(
        {"restrict_mode": True, "ports": [{"port": 1}, {"port": 1, "pp": True}]}
    )
    assert p.ports == {1: True}
    assert PortPolicy.from_json(p.to_json()) == p
    assert hash(p) == hash(PortPolicy.from_json(p.to_json()))


def test_policy_from_agent_info() -> None:
    assert policy_from_agent_info({"tcb_info": ""}) is OPEN_POLICY
    compose = {"port_policy": {"restrict_mode": True, "ports": [{"port": 8080, "pp": False}]}}
    info = {"tcb_info": json.dumps({"app_compose": json.dumps(compose)})}
    assert policy_from_agent_info(info) == PortPolicy(True, {8080: False})
    no_policy = {"tcb_info": json.dumps({"app_compose": json.dumps({"name": "x"})})}
    assert policy_from_agent_info(no_policy) is OPEN_POLICY
    for bad in (
        {"tcb_info": "{"},
        {"tcb_info": "[]"},
        {"tcb_info": 5},
        {"tcb_info": json.dumps({"app_compose": "not json"})},
        {"tcb_info": json.dumps({"app_compose": 3})},
        {"tcb_info": json.dumps({"app_compose": json.dumps({"port_policy": {"ports": 1}})})},
    ):
        with pytest.raises(PortPolicyError):
            policy_from_agent_info(bad)
