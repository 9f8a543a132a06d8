"""JSON from untrusted peers, with its nesting bounded before the parser sees it.

CPython's C JSON scanner recurses per nesting level; a few tens of thousands of `[` can exhaust
the C stack and crash the process instead of raising RecursionError.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_DEPTH = 64


def nesting_depth(data: str | bytes) -> int:
    """the deepest `[`/`{` nesting outside string literals."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
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


def loads(data: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """json.loads that raises ValueError for nesting deeper than `max_depth`."""
    if nesting_depth(data) > max_depth:
        raise ValueError(f"json nested deeper than {max_depth} levels")
    return json.loads(data)
