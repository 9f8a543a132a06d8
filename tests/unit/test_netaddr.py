"""ports and decimals from outside: ASCII digits only, in range, or None (and each caller's own
error), never a ValueError from int() or a second spelling of a number."""

from __future__ import annotations

import argparse

import pytest

from pydstack.certbot.errors import CertbotInputError
from pydstack.certbot.model import _port as certbot_port
from pydstack.errors import ConfigError
from pydstack.gateway.app_address import AppAddressError, parse_app_address
from pydstack.gateway.proxy_protocol import ProxyProtocolError, parse_proxy_header
from pydstack.gateway.settings import split_address
from pydstack.guest.simulator import _hostport
from pydstack.types.netaddr import ascii_decimal, parse_port

#: str.isdigit() is true of each; none is a port
NOT_ASCII = ["\u00b2", "8\u00b3", "\u0668\u0660", "\uff18\uff10", "\u0968\u0966"]


def test_ports_are_ascii_digits_in_range() -> None:
    assert parse_port("1") == 1 and parse_port("65535") == 65535 and parse_port("00080") == 80
    for bad in ["", "0", "65536", "123456", "-1", "+80", " 80", "80 ", "8_0", "0x50", *NOT_ASCII]:
        assert parse_port(bad) is None, bad
    assert parse_port("0", allow_zero=True) == 0
    assert ascii_decimal("1" * 20, 20) == int("1" * 20) and ascii_decimal("1" * 21, 20) is None
    assert ascii_decimal("\u00b2", 5) is None


@pytest.mark.parametrize("digits", NOT_ASCII)
def test_every_port_reader_refuses_non_ascii_digits_with_its_own_error(digits: str) -> None:
    with pytest.raises(ConfigError):
        split_address(f"127.0.0.1:{digits}", "core.rpc")
    with pytest.raises(AppAddressError):
        parse_app_address(f"app1:{digits}")
    with pytest.raises(CertbotInputError):
        certbot_port(digits, "ns")
    with pytest.raises(argparse.ArgumentTypeError):
        _hostport(f"127.0.0.1:{digits}")
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(f"PROXY TCP4 1.2.3.4 5.6.7.8 {digits} 80\r\n".encode())
