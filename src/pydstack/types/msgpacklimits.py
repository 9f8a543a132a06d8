"""msgpack from untrusted peers, decoded with every count bounded before it is allocated.

msgpack's unpacker allocates a list of the length an array header declares as soon as it reads
the header, whatever follows: 3 KB of nested `dc ff ff` headers made it allocate 80 MB (a
fuzzing finding), and its own `max_array_len` only caps each list. `loads` walks the document
itself instead: an array or map header's count must fit in the bytes left (every element takes
at least one byte) and under the caps below, and nesting is bounded, before the container is
built; scalars are read by msgpack's C unpacker under its length limits.

The contract of `loads`:
- the result is built from `None`, `bool`, `int`, `float`, `str`, `bytes`, `list` and `dict`
  with `str` keys (`raw=False`: str is UTF-8); extension types are refused.
- at most `max_depth` levels of arrays and maps, `max_array` items per array, `max_map` pairs
  per map; one document filling the input exactly (no trailing bytes).
- every failure is a `MsgpackError` (an `InputError`).

Cost: linear in the input; memory at most a small multiple of the input (no container larger
than the bytes that remain when its header is read).
"""

from __future__ import annotations

from typing import Any

import msgpack

from pydstack.errors import InputError

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_ARRAY = 64 * 1024
DEFAULT_MAX_MAP = 1024


class MsgpackError(InputError):
    """the msgpack input is malformed, nested too deeply, or declares more than it holds."""


def _is_array(head: int) -> bool:
    return 0x90 <= head <= 0x9F or head in (0xDC, 0xDD)


def _is_map(head: int) -> bool:
    return 0x80 <= head <= 0x8F or head in (0xDE, 0xDF)


class _Walker:
    def __init__(self, data: bytes, max_depth: int, max_array: int, max_map: int) -> None:
        self.data = data
        self.max_depth = max_depth
        self.max_array = max_array
        self.max_map = max_map
        self.unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            max_buffer_size=max(len(data), 1),
            max_bin_len=len(data),
            max_str_len=len(data),
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
        self.unpacker.feed(data)

    def left(self) -> int:
        return len(self.data) - int(self.unpacker.tell())

    def value(self, depth: int) -> Any:
        pos = self.unpacker.tell()
        if pos >= len(self.data):
            raise MsgpackError("msgpack is truncated")
        head = self.data[pos]
        if _is_array(head) or _is_map(head):
            if depth >= self.max_depth:
                raise MsgpackError(f"msgpack nested deeper than {self.max_depth} levels")
            if _is_array(head):
                n = self.unpacker.read_array_header()
                if n > self.max_array or n > self.left():
                    raise MsgpackError(f"msgpack array of {n} items is too long")
                return [self.value(depth + 1) for _ in range(n)]
            n = self.unpacker.read_map_header()
            if n > self.max_map or 2 * n > self.left():
                raise MsgpackError(f"msgpack map of {n} pairs is too long")
            out: dict[str, Any] = {}
            for _ in range(n):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise MsgpackError("msgpack map keys must be strings")
                out[key] = self.value(depth + 1)
            return out
        return self.unpacker.unpack()


def loads(
    data: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_array: int = DEFAULT_MAX_ARRAY,
    max_map: int = DEFAULT_MAX_MAP,
) -> Any:
    """one msgpack document under the contract in the module docstring; MsgpackError if not."""
    data = bytes(data)
    walker = _Walker(data, max_depth, max_array, max_map)
    try:
        doc = walker.value(0)
    except MsgpackError:
        raise
    except Exception as e:  # msgpack raises several exception types on malformed input
        raise MsgpackError(f"msgpack is malformed: {type(e).__name__}: {e}"[:200]) from None
    if walker.left():
        raise MsgpackError(f"msgpack has {walker.left()} trailing bytes")
    return doc
