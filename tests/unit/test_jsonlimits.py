"""deeply nested json from a peer is refused instead of crashing the process."""

from __future__ import annotations

import pytest

from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import event_log_from_json
from pydstack.attest.identity import os_image_hash_from_config
from pydstack.crypto.envcrypt import EnvError, parse_env_json
from pydstack.types import jsonlimits
from pydstack.types.sysconfig import SysConfig, SysConfigError

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


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_non_utf8_bodies_are_refused_before_the_depth_check_can_be_fooled(codec: str):
    # json.loads(bytes) would guess these encodings, and the old byte-wise depth check saw
    # only NUL-separated brackets: 5000 levels slipped through and overflowed the parser
    deep = ("[" * 5000 + "]" * 5000).encode(codec)
    with pytest.raises(ValueError, match="json must be utf-8"):
        jsonlimits.loads(deep)
    with pytest.raises(ValueError, match="json must be utf-8"):
        jsonlimits.loads('{"a": 1}'.encode(codec))


def test_utf8_depth_size_and_bom():
    with pytest.raises(ValueError, match="nested deeper than 64"):
        jsonlimits.loads(("[" * 5000 + "]" * 5000).encode())
    assert jsonlimits.loads('{"a": ["é", {"b": null}]}'.encode()) == {"a": ["é", {"b": None}]}
    assert jsonlimits.loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a utf-8 bom is dropped
    with pytest.raises(ValueError, match="exceeds 8 bytes"):
        jsonlimits.loads(b'{"a": 12}', max_bytes=8)
    with pytest.raises(ValueError, match="exceeds 8 bytes"):
        jsonlimits.loads('["éééé"]', max_bytes=8)  # 8 characters, 12 bytes
    # escaped lone surrogates are legal json: they reach the caller as they are
    assert jsonlimits.loads('"\\udfff"') == "\udfff"


def test_depth_counting_handles_escapes():
    assert jsonlimits.nesting_depth('["\\\\", ["\\"]["]]') == 2
    assert jsonlimits.nesting_depth('"[[[\\\\"') == 0
