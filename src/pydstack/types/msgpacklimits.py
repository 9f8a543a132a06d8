"""msgpack from untrusted peers, decoded with every count bounded before it is allocated.

msgpack's unpacker allocates a list of the length an array header declares as soon as it reads
the header, whatever follows: 3 KB of nested `dc ff ff` headers made it allocate 80 MB (a
fuzzing finding), and its own `max_array_len` only caps each list. `loads` therefore reads a
document twice. First msgpack's C unpacker skips over it, which builds nothing: the document
must be complete (every item an array or map header declares is there, so no container is
larger than the bytes it spans) and fill the input exactly. Only then does it build the
document, under its length caps, and a walk over the containers (not the scalars) checks their
nesting and map keys.

The contract of `loads`:
- the result is built from `None`, `bool`, `int`, `float`, `str`, `bytes`, `list` and `dict`
  with `str` keys (`raw=False`: str is UTF-8); extension types are refused.
- at most `max_depth` levels of arrays and maps, `max_array` items per array, `max_map` pairs
  per map; one document filling the input exactly (no trailing bytes).
- every failure is a `MsgpackError` (an `InputError`).

Cost: linear in the input, in C but for one Python step per container; memory at most a small
multiple of the input (each item of a container takes at least one byte of it).
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


def _complete(data: bytes) -> None:
    """MsgpackError unless `data` is exactly one whole document (checked without building)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        unpacker.skip()
    except msgpack.OutOfData:
        raise MsgpackError(
            "msgpack is truncated: an item, or an item an array or map declares, is missing"
        ) from None
    except Exception as e:  # FormatError, StackError (nesting beyond msgpack's own stack)
        raise MsgpackError(f"msgpack is malformed: {type(e).__name__}: {e}"[:200]) from None
    left = len(data) - int(unpacker.tell())
    if left:
        raise MsgpackError(f"msgpack has {left} trailing bytes")


#: what a decoded document may hold that is not a leaf: walked, or refused
_NESTED = frozenset({list, dict, msgpack.ExtType, msgpack.Timestamp})


def _check_tree(doc: Any, max_depth: int) -> None:
    """nesting within `max_depth`, string keys, no extension types: one level at a time, the
    type tests over each container's items in C (a quote's 5,000 ints cost no Python step)."""
    level, depth, only_str = [doc], 1, {str}
    while level:
        if depth > max_depth:
            raise MsgpackError(f"msgpack nested deeper than {max_depth} levels")
        below: list[Any] = []
        for node in level:
            kind = type(node)
            if kind is dict:
                if not only_str.issuperset(map(type, node)):
                    raise MsgpackError("msgpack map keys must be strings")
                items = node.values()
            elif kind is list:
                items = node
            else:  # the only other types in _NESTED
                raise MsgpackError("msgpack extension types are not accepted")
            if not _NESTED.isdisjoint(map(type, items)):
                below.extend(v for v in items if type(v) in _NESTED)
        level, depth = below, depth + 1


def loads(
    data: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_array: int = DEFAULT_MAX_ARRAY,
    max_map: int = DEFAULT_MAX_MAP,
) -> Any:
    """one msgpack document under the contract in the module docstring; MsgpackError if not."""
    data = bytes(data)
    if not data:
        raise MsgpackError("msgpack is truncated: the input is empty")
    _complete(data)
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # checked, with a clearer message, by _check_tree
            max_bin_len=len(data),
            max_str_len=len(data),
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except ValueError as e:
        what = str(e)
        if "exceeds max_array_len" in what or "exceeds max_map_len" in what:
            kind = "array" if "array" in what else "map"
            raise MsgpackError(f"msgpack {kind} too long: {what}"[:200]) from None
        raise MsgpackError(f"msgpack is malformed: {type(e).__name__}: {e}"[:200]) from None
    except Exception as e:  # msgpack raises several exception types on malformed input
        raise MsgpackError(f"msgpack is malformed: {type(e).__name__}: {e}"[:200]) from None
    if type(doc) in _NESTED:
        _check_tree(doc, max_depth)
    return doc
