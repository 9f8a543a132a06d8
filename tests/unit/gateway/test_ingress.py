"""the ingress grammar of §2.3, its test table and the special ids."""

from __future__ import annotations

import pytest

from pydstack.errors import InputError
from pydstack.gateway.ingress import (
    Destination,
    IngressError,
    Kind,
    Mode,
    classify,
    parse_destination,
    split_sni,
)


@pytest.mark.parametrize(
    ("sub", "dest"),
    [
        # upstream's table
        ("myapp", Destination("myapp", 80, Mode.TERMINATE)),
        ("myapp-8080", Destination("myapp", 8080, Mode.TERMINATE)),
        ("myapp-443s", Destination("myapp", 443, Mode.PASSTHROUGH)),
        ("myapp-s", Destination("myapp", 443, Mode.PASSTHROUGH)),
        ("myapps", Destination("myapps", 80, Mode.TERMINATE)),
        # the h2 suffix and the defaults around it
        ("myapp-g", Destination("myapp", 80, Mode.H2)),
        ("myapp-8080g", Destination("myapp", 8080, Mode.H2)),
        ("myapp-", Destination("myapp", 80, Mode.TERMINATE)),
        ("myapp-1", Destination("myapp", 1, Mode.TERMINATE)),
        ("myapp-65535s", Destination("myapp", 65535, Mode.PASSTHROUGH)),
        ("myappg", Destination("myappg", 80, Mode.TERMINATE)),
    ],
)
def test_grammar_table(sub: str, dest: Destination) -> None:
    assert parse_destination(sub) == dest


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        ("a-b-c", "invalid sni format"),
        ("my-app-80", "invalid sni format"),
        ("-80", "empty id"),
        ("", "empty id"),
        ("myapp-80sg", "`gs` is not allowed"),
        ("myapp-sg", "`gs` is not allowed"),
        ("myapp-80gs", "invalid port"),
        ("myapp-abc", "invalid port"),
        ("myapp-0", "invalid port"),
        ("myapp-65536", "invalid port"),
        ("myapp-123456", "invalid port"),
        ("myapp-+80", "invalid port"),
        ("myapp-٣", "invalid port"),
    ],
)
def test_grammar_refusals(sub: str, message: str) -> None:
    with pytest.raises(IngressError, match=message):
        parse_destination(sub)


def test_split_at_the_first_dot() -> None:
    assert split_sni("app-80.a.example.com") == ("app-80", "a.example.com")
    for bad in ("nodot", ".example.com", "app."):
        with pytest.raises(IngressError):
            split_sni(bad)


def test_special_ids_only_on_plain_port_80() -> None:
    assert classify("gateway.example.com").kind is Kind.GATEWAY
    assert classify("gateway-80.example.com").kind is Kind.GATEWAY
    assert classify("health.example.com").kind is Kind.HEALTH
    for sni in ("gateway-443s.example.com", "gateway-8080.example.com", "health-g.example.com"):
        with pytest.raises(IngressError, match="accepts only port 80"):
            classify(sni)


def test_localhost_only_with_the_debug_switch() -> None:
    on = classify("localhost-8080s.example.com", localhost_backend=True)
    assert on.kind is Kind.LOCALHOST
    assert on.dest == Destination("localhost", 8080, Mode.PASSTHROUGH)
    off = classify("localhost-8080s.example.com")
    assert off.kind is Kind.APP and off.dest.id == "localhost"


def test_app_target_carries_the_base_domain() -> None:
    t = classify("abc-8080g.apps.example.com")
    assert (t.kind, t.dest, t.base_domain) == (
        Kind.APP,
        Destination("abc", 8080, Mode.H2),
        "apps.example.com",
    )
    assert issubclass(IngressError, InputError)
