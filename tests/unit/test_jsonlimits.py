"""deeply nested json from a peer is refused instead of crashing the process."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _reference_depth(text: str) -> int:
    """the depth, character by character (the loop nesting_depth used before a fuzzing run
    showed it near its time bound: ~1 us per bracket, 7 ms for 10 KiB of `[`)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet='[]{}"\\ax\n', max_size=60))
def test_depth_matches_the_character_by_character_count(text: str):
    assert jsonlimits.nesting_depth(text) == _reference_depth(text)


def test_few_brackets_skip_the_depth_scan(monkeypatch: pytest.MonkeyPatch):
    # a /verify body is one object around a long hex string: its depth cannot exceed its
    # bracket count, so the string is not scanned for string literals
    def scanned(_text: object) -> int:
        raise AssertionError("nesting_depth ran")

    monkeypatch.setattr(jsonlimits, "nesting_depth", scanned)
    body = '{"attestation": "' + "ab" * 50_000 + '"}'
    assert jsonlimits.loads(body)["attestation"] == "ab" * 50_000
    assert jsonlimits.loads("[" * 3 + "]" * 3, max_depth=3) == [[[]]]
    with pytest.raises(AssertionError, match="nesting_depth ran"):
        jsonlimits.loads("[" * 4 + "]" * 4, max_depth=3)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet='[]{}"\\ax,', max_size=40), st.integers(0, 6))
def test_depth_limit_holds_whatever_the_bracket_count(text: str, depth: int):
    # refused for depth exactly when the full scan says it is too deep, skip or no skip
    try:
        jsonlimits.loads(text, max_depth=depth)
    except jsonlimits.JsonError as e:
        too_deep = "nested deeper" in str(e)
    else:
        too_deep = False
    assert too_deep == (_reference_depth(text) > depth)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet='[]{}",1 ', max_size=30), st.integers(0, 12))
def test_item_limit_holds_whatever_the_length(text: str, items: int):
    # the count is skipped only for a text no longer than the limit, which cannot exceed it
    try:
        jsonlimits.loads(text, max_items=items)
    except jsonlimits.JsonError as e:
        too_many = "more than" in str(e)
    else:
        too_many = False
    counted = text.count("{") + text.count("[") + text.count(",")
    assert too_many == (counted > items)


def test_depth_check_is_not_quadratic_in_unterminated_strings():
    # a string-literal pattern that could fail and retry from every later quote would take
    # minutes here; the count must see one unterminated string running to the end
    text = '"' + '\\"' * 200_000 + "\\"
    assert jsonlimits.nesting_depth(text) == 0
    assert jsonlimits.nesting_depth("[" + text) == 1


@pytest.mark.parametrize(
    "doc", [b"[1,", b"\xff", b"[" * 100, b"1" * 5000, b'{"a": 1}' * 2, b"\x00[]"]
)
def test_every_refusal_is_a_json_error(doc: bytes):
    with pytest.raises(jsonlimits.JsonError):
        jsonlimits.loads(doc)


LONE = [
    b'{"kms_urls": ["\\ud83d\\u00e9"]}',  # a high surrogate, then no low one
    b'{"name": "\\udfff"}',  # a low surrogate alone
    '{"name": "\udce9"}',  # a str document with a raw lone surrogate
    b'{"\\ud800": 1}',  # in a key
]


@pytest.mark.parametrize("doc", LONE)
def test_documents_refuse_lone_surrogates(doc):
    # a fuzzing finding: a sys-config holding "\ud83d" + "\udce9" parsed, and its own json
    # form read back as one astral character (serde_json, upstream, refuses them outright)
    from pydstack.guest.appkeys import AppKeys, AppKeysError
    from pydstack.guest.instance import InstanceInfo, InstanceInfoError
    from pydstack.types.app_compose import AppCompose, AppComposeError

    for parse, error in (
        (SysConfig.from_json, SysConfigError),
        (AppCompose.parse, AppComposeError),
        (AppKeys.from_json, AppKeysError),
        (InstanceInfo.from_json, InstanceInfoError),
    ):
        if parse is AppCompose.parse and isinstance(doc, str):
            continue  # refused before json (its hash is over utf-8 bytes)
        with pytest.raises(error, match="lone surrogate"):
            parse(doc)


def test_paired_surrogate_escapes_are_text():
    doc = jsonlimits.loads(b'{"a": "\\ud83d\\ude00"}', surrogates=False)
    assert doc == {"a": "\U0001f600"}
    assert jsonlimits.loads(b'"\\udfff"') == "\udfff"  # loads alone keeps them by default


@pytest.mark.parametrize(
    "doc", [b'{"a": NaN}', b"[Infinity]", b"[-Infinity]", b"1e999", b'{"t": -1E400}']
)
def test_non_finite_numbers_are_not_json(doc: bytes) -> None:
    """json.loads reads NaN, Infinity and overflowing numbers (serde_json, upstream's parser,
    refuses them): a timeout or interval of NaN compares false with everything."""
    with pytest.raises(jsonlimits.JsonError, match=r"not a json number|out of range"):
        jsonlimits.loads(doc)
    assert jsonlimits.loads(b"[1e308, -0.0, 2e-400, 1.5]") == [1e308, -0.0, 0.0, 1.5]
