"""JSON from untrusted peers, decoded one way and with its nesting bounded before parsing.

CPython's C JSON scanner recurses per nesting level; a few tens of thousands of `[` can exhaust
the C stack and crash the process instead of raising RecursionError, so the depth is measured
on the exact text the parser will see.

The contract of `loads`:
- bytes must be UTF-8 (`json.loads` would also guess UTF-16/32, which the depth check could not
  see through); a leading UTF-8 byte order mark is stripped (RFC 8259 lets a parser ignore it;
  `json.loads(bytes)` always did). Anything else, NUL bytes included (never valid JSON, and
  how UTF-16/32 without a BOM looks), raises JsonError("json must be utf-8 ...").
  A `str` is taken as is.
- at most `max_bytes` (UTF-8 bytes), `max_depth` levels of `[`/`{` and `max_items` values
  besides the top-level one (counted as the `{`, `[` and `,` in the text, strings included,
  so over-counted, never under-counted, and at C speed before anything is built); otherwise
  JsonError.
- every failure is a `JsonError` (an `InputError`, so a ValueError): malformed JSON, an
  integer of more digits than Python converts, `NaN`, `Infinity`, `-Infinity` and numbers
  beyond a float's range (json.loads reads these; they are not JSON), and every limit above.
  So every float that comes back is finite.
- escaped lone surrogates (`"\\udfff"`) are legal JSON and come back as lone surrogates in the
  resulting str; callers that encode such strings (hashing, printing) must handle that, or
  pass `surrogates=False` to have them refused (as serde_json, upstream's parser, refuses
  them). `load_object`, for documents, always refuses them.

Cost: linear. The depth is measured by regular expressions and C iterators (no Python loop
per character), and only when the text holds more opening brackets than `max_depth` (a
request of a few objects around long strings is not scanned); then the C parser runs; no
recursion deeper than `max_depth`. Memory: about twice the text for the depth check, then
what the document builds.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any

from pydstack.errors import InputError

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: a bound on containers and elements: 10 MiB of `[{},{},...` would build 2.6M dicts
DEFAULT_MAX_ITEMS = 250_000
#: a string literal: escapes taken whole, possessively (no backtracking), an unterminated one
#: (a trailing lone backslash included) running to the end of the text
_STRING = re.compile(r'"(?:[^"\\]++|\\.|\\\Z)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonError(InputError):
    """the JSON input is malformed, not UTF-8, too large, too deep or holds too many values."""


def decode(data: str | bytes, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """the JSON text of `data`: bytes must be UTF-8 (a leading BOM is dropped), and at most
    `max_bytes` long (a str counted in UTF-8); JsonError otherwise."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonError(f"json exceeds {max_bytes} bytes")
    if isinstance(data, str):
        if (
            max_bytes is not None
            and len(data) * 4 > max_bytes
            and len(data.encode("utf-8", "surrogatepass")) > max_bytes
        ):
            raise JsonError(f"json exceeds {max_bytes} bytes")
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonError(f"json must be utf-8 (invalid byte at offset {e.start})") from None
    if "\0" in text:  # never valid json; what UTF-16/32 without a bom looks like
        raise JsonError("json must be utf-8 (it holds NUL bytes)")
    return text.removeprefix("\ufeff")


def nesting_depth(data: str | bytes) -> int:
    """the deepest `[`/`{` nesting outside string literals (bytes: UTF-8, else JsonError).

    String literals (an unterminated one runs to the end) are cut out and the brackets left
    summed, all by regular expressions and C iterators: linear, a few ns per character.
    """
    text = decode(data, max_bytes=None)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(0, max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a json number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


#: json.loads would read NaN, Infinity and -Infinity (not JSON; serde_json, upstream's parser,
#: refuses them) and numbers like 1e999 as infinity; this decoder refuses all four
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads(
    data: str | bytes,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_items: int = DEFAULT_MAX_ITEMS,
    *,
    surrogates: bool = True,
) -> Any:
    """json.loads under the contract in the module docstring; JsonError for bad input (with
    `surrogates=False`, also for a string or key holding a lone surrogate)."""
    text = decode(data, max_bytes)
    opening = text.count("{") + text.count("[")
    # each counted value takes a character: a text no longer than the limit cannot exceed it
    if len(text) > max_items and opening + text.count(",") > max_items:
        raise JsonError(f"json holds more than {max_items} values")
    # no nesting is deeper than the count of opening brackets: measured only when it could be
    if opening > max_depth and nesting_depth(text) > max_depth:
        raise JsonError(f"json nested deeper than {max_depth} levels")
    try:
        obj = _DECODER.decode(text)
    except ValueError as e:  # JSONDecodeError, int() refusing more than 4300 digits, and ours
        raise JsonError(str(e)) from None
    if not surrogates:
        try:  # escapes can pair into valid text or not; raw characters were checked as text
            if "\\u" in text:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            else:
                text.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonError("json holds a lone surrogate (an unpaired \\ud800-\\udfff)") from None
    return obj


def load_object(
    data: str | bytes,
    what: str,
    *,
    max_bytes: int,
    error: Callable[[str], Exception] = JsonError,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """a JSON object document (a file or message body) under `loads`' contract, lone
    surrogates refused, or `error(message)` naming `what`; with `allow_empty`, blank input is
    an empty object."""
    if len(data) > max_bytes:
        raise error(f"{what} too large ({len(data)} bytes, max {max_bytes})")
    if allow_empty and not data.strip():
        return {}
    try:
        obj = loads(data, max_bytes=max_bytes, surrogates=False)
    except ValueError as e:
        raise error(f"{what} is not valid json: {e}") from e
    if not isinstance(obj, dict):
        raise error(f"{what} must be a json object")
    return obj
