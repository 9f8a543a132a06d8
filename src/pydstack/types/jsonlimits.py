"""JSON from untrusted peers, decoded one way and with its nesting bounded before parsing.

CPython's C JSON scanner recurses per nesting level; a few tens of thousands of `[` can exhaust
the C stack and crash the process instead of raising RecursionError, so the depth is measured
on the exact text the parser will see.

The contract of `loads`:
- bytes must be UTF-8 (`json.loads` would also guess UTF-16/32, which the depth check could not
  see through); a leading UTF-8 byte order mark is stripped (RFC 8259 lets a parser ignore it;
  `json.loads(bytes)` always did). Anything else, NUL bytes included (never valid JSON, and
  how UTF-16/32 without a BOM looks), raises ValueError("json must be utf-8 ...").
  A `str` is taken as is.
- at most `max_bytes` (UTF-8 bytes), `max_depth` levels of `[`/`{` and `max_items` values
  (counted as the `{`, `[` and `,` in the text, strings included, so over-counted, never
  under-counted, and at C speed before anything is built); otherwise ValueError.
- every failure is a ValueError (json.JSONDecodeError is one).
- escaped lone surrogates (`"\\udfff"`) are legal JSON and come back as lone surrogates in the
  resulting str; callers that encode such strings (hashing, printing) must handle that.

Cost: one linear scan for the depth, then the C parser; no recursion deeper than `max_depth`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: a bound on containers and elements: 10 MiB of `[{},{},...` would build 2.6M dicts
DEFAULT_MAX_ITEMS = 250_000
_STRUCTURAL = re.compile(r'["\\\[\]{}]')


def decode(data: str | bytes, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """the JSON text of `data`: bytes must be UTF-8 (a leading BOM is dropped), and at most
    `max_bytes` long (a str counted in UTF-8); ValueError otherwise."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"json exceeds {max_bytes} bytes")
    if isinstance(data, str):
        if (
            max_bytes is not None
            and len(data) * 4 > max_bytes
            and len(data.encode("utf-8", "surrogatepass")) > max_bytes
        ):
            raise ValueError(f"json exceeds {max_bytes} bytes")
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"json must be utf-8 (invalid byte at offset {e.start})") from None
    if "\0" in text:  # never valid json; what UTF-16/32 without a bom looks like
        raise ValueError("json must be utf-8 (it holds NUL bytes)")
    return text.removeprefix("\ufeff")


def nesting_depth(data: str | bytes) -> int:
    """the deepest `[`/`{` nesting outside string literals (bytes: UTF-8, else ValueError)."""
    text = decode(data, max_bytes=None)
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    for m in _STRUCTURAL.finditer(text):
        i = m.start()
        ch = text[i]
        if in_string:
            if i == escaped_at:
                continue
            if ch == "\\":
                escaped_at = i + 1
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


def loads(
    data: str | bytes,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> Any:
    """json.loads under the contract in the module docstring; ValueError for bad input."""
    text = decode(data, max_bytes)
    if text.count("{") + text.count("[") + text.count(",") > max_items:
        raise ValueError(f"json holds more than {max_items} values")
    if nesting_depth(text) > max_depth:
        raise ValueError(f"json nested deeper than {max_depth} levels")
    return json.loads(text)


def load_object(
    data: str | bytes,
    what: str,
    *,
    max_bytes: int,
    error: Callable[[str], Exception] = ValueError,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """a JSON object document (a file or message body) under `loads`' contract, or
    `error(message)` naming `what`; with `allow_empty`, blank input is an empty object."""
    if len(data) > max_bytes:
        raise error(f"{what} too large ({len(data)} bytes, max {max_bytes})")
    if allow_empty and not data.strip():
        return {}
    try:
        obj = loads(data, max_bytes=max_bytes)
    except ValueError as e:
        raise error(f"{what} is not valid json: {e}") from e
    if not isinstance(obj, dict):
        raise error(f"{what} must be a json object")
    return obj
