"""fixtures of the integration tests: for the certbot, a real bind9 for the test zones and a real
pebble validating DNS-01 through it (one pair per test module)."""

from __future__ import annotations

import pytest

from pydstack.certbot.acme_client import AcmeOptions
from pydstack.certbot.devdns import DevBind, DevPebble

ZONES = ("example.test", "cf.test", "down.test", "lock.test", "other.test")


@pytest.fixture(scope="module")
def bind(tmp_path_factory):
    b = DevBind.start(tmp_path_factory.mktemp("bind"), ZONES)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def pebble(bind, tmp_path_factory):
    p = DevPebble.start(tmp_path_factory.mktemp("pebble"), bind.server)
    yield p
    p.stop()


def acme_options(bind: DevBind, pebble: DevPebble) -> AcmeOptions:
    return AcmeOptions(ca_bundle=str(pebble.ca_bundle), dns_servers=(bind.server,))
