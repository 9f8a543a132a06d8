"""a small CBOR (RFC 8949) codec for measurement documents: bounded decoding, canonical encoding.

Only what upstream's measurement files use: unsigned and negative integers, byte strings, text
strings, arrays, maps with text keys, booleans and null. Encoding writes every length in its
shortest form and keeps map keys in the order given (serde/ciborium writes a struct's fields in
declaration order), so a document decoded and encoded again gives the same bytes.

Decoding refuses, with :class:`ParseError`, anything else: indefinite lengths, tags, floats,
simple values other than false/true/null, non-text map keys, duplicate keys, trailing bytes,
invalid UTF-8, nesting deeper than `max_depth`, and every declared length or item count that the
remaining input cannot hold (so an absurd size is refused before anything is allocated).
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import ParseError

MAX_DEPTH = 16
MAX_DOCUMENT = 1024 * 1024

_UINT, _NINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG, _SIMPLE = range(8)


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 0x100:
        return bytes([major << 5 | 24, value])
    if value < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", value)
    if value < 0x100000000:
        return bytes([major << 5 | 26]) + struct.pack(">I", value)
    if value < 0x10000000000000000:
        return bytes([major << 5 | 27]) + struct.pack(">Q", value)
    raise ValueError("integer does not fit in 64 bits")


def encode(obj: Any) -> bytes:
    """the CBOR bytes of `obj` (int, bytes, str, list/tuple, dict with str keys, bool, None);
    ValueError for anything else or an integer outside the 64-bit ranges."""
    out = bytearray()
    _encode(obj, out, 0)
    return bytes(out)


def _encode(obj: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("cbor document nested too deeply")
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        out += _head(_UINT, obj) if obj >= 0 else _head(_NINT, -1 - obj)
    elif isinstance(obj, bytes | bytearray):
        out += _head(_BYTES, len(obj)) + obj
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out += _head(_TEXT, len(raw)) + raw
    elif isinstance(obj, list | tuple):
        out += _head(_ARRAY, len(obj))
        for item in obj:
            _encode(item, out, depth + 1)
    elif isinstance(obj, dict):
        out += _head(_MAP, len(obj))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError("cbor map keys must be text")
            _encode(key, out, depth + 1)
            _encode(value, out, depth + 1)
    else:
        raise ValueError(f"cannot encode {type(obj).__name__} as cbor")


class _Reader:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth

    def _take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise ParseError(
                f"cbor {what} of {n} bytes at offset {self.pos} runs past the end of the input"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self._take(1, "length")[0]
        if info == 25:
            return int(struct.unpack(">H", self._take(2, "length"))[0])
        if info == 26:
            return int(struct.unpack(">I", self._take(4, "length"))[0])
        if info == 27:
            return int(struct.unpack(">Q", self._take(8, "length"))[0])
        if info == 31:
            raise ParseError("cbor indefinite lengths are not supported")
        raise ParseError(f"cbor reserved additional information {info}")

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise ParseError(f"cbor document nested deeper than {self.max_depth}")
        start = self.pos
        initial = self._take(1, "item head")[0]
        major, info = initial >> 5, initial & 0x1F
        if major == _SIMPLE:
            simple = {20: False, 21: True, 22: None}
            if info in simple:
                return simple[info]
            raise ParseError(f"cbor simple value or float {initial:#04x} at offset {start}")
        if major == _TAG:
            raise ParseError(f"cbor tags are not supported (offset {start})")
        value = self._argument(info)
        if major == _UINT:
            return value
        if major == _NINT:
            return -1 - value
        remaining = len(self.data) - self.pos
        if major == _BYTES:
            return self._take(value, "byte string")
        if major == _TEXT:
            raw = self._take(value, "text string")
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ParseError(f"cbor text string at offset {start} is not utf-8") from e
        if major == _ARRAY:
            if value > remaining:  # every item takes at least one byte
                raise ParseError(f"cbor array of {value} items cannot fit in {remaining} bytes")
            return [self.item(depth + 1) for _ in range(value)]
        # major == _MAP
        if value * 2 > remaining:
            raise ParseError(f"cbor map of {value} entries cannot fit in {remaining} bytes")
        out: dict[str, Any] = {}
        for _ in range(value):
            key = self.item(depth + 1)
            if not isinstance(key, str):
                raise ParseError("cbor map keys must be text strings")
            if key in out:
                raise ParseError(f"cbor map has a duplicate key {key[:64]!r}")
            out[key] = self.item(depth + 1)
        return out


def decode(data: bytes, *, max_size: int = MAX_DOCUMENT, max_depth: int = MAX_DEPTH) -> Any:
    """the value of one CBOR item that is all of `data`; ParseError for anything the module
    docstring lists, or input longer than `max_size` bytes."""
    if not isinstance(data, bytes | bytearray):
        raise ParseError("cbor input must be bytes")
    if len(data) > max_size:
        raise ParseError(f"cbor document larger than {max_size} bytes")
    reader = _Reader(bytes(data), max_depth)
    value = reader.item(0)
    if reader.pos != len(data):
        raise ParseError(f"cbor document has {len(data) - reader.pos} trailing bytes")
    return value
