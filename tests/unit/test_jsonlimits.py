"""deeply nested json from a peer is refused instead of crashing the process."""

from __future__ import annotations

import pytest

from pydstack import jsonlimits
from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import event_log_from_json
from pydstack.attest.identity import os_image_hash_from_config
from pydstack.crypto.envcrypt import EnvError, parse_env_json
from pydstack.guest.sysconfig import SysConfig, SysConfigError

BOMB = b"[" * 200_000


def test_depth_counting_ignores_strings():
    assert jsonlimits.nesting_depth('{"a": [1, {"b": "[[[[\\"{"}]}') == 3
    assert jsonlimits.loads('[[["x"]]]') == [[["x"]]]
    with pytest.raises(ValueError, match="nested deeper than 64"):
        jsonlimits.loads(BOMB)


def test_parsers_refuse_nesting_bombs():
    with pytest.raises(ParseError):
        event_log_from_json(BOMB)
    with pytest.raises(EnvError):
        parse_env_json(BOMB)
    with pytest.raises(SysConfigError):
        SysConfig.from_json(BOMB[:100_000])
    assert os_image_hash_from_config(BOMB[:100_000].decode()) == b""
