"""the TXT value of a custom domain."""

from __future__ import annotations

import pytest

from pydstack.gateway.app_address import AppAddress, AppAddressError, parse_app_address


def test_parse() -> None:
    assert parse_app_address("3327603e03f5bd1f830812ca4a789277fc31f577:8090") == AppAddress(
        "3327603e03f5bd1f830812ca4a789277fc31f577", 8090
    )
    assert parse_app_address(" ABC:443 ") == AppAddress("abc", 443)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        ":80",
        "abc:",
        "abc:0",
        "abc:65536",
        "a-b:80",
        "a.b:80",
        "abc:8o",
        "x" * 129 + ":1",
    ],
)
def test_refusals(value: str) -> None:
    with pytest.raises(AppAddressError):
        parse_app_address(value)
