"""SCALE codec primitives (Parity's simple concatenated aggregate little-endian).

Used by the legacy V0 attestation and the KMS certificate signing request. The reader is bounded:
a declared length beyond the remaining input is a :class:`ParseError` before anything is read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

from .errors import ParseError

T = TypeVar("T")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > len(self.data):
            raise ParseError(f"scale: need {n} bytes at offset {pos}, {self.remaining} left")
        self.pos = end
        return self.data[pos:end]

    def read_u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise ParseError(f"scale: need 1 bytes at offset {pos}, 0 left")
        self.pos = pos + 1
        return self.data[pos]

    def _fixed(self, n: int) -> int:
        """the offset of the next `n` bytes, which are then consumed."""
        pos = self.pos
        if pos + n > len(self.data):
            raise ParseError(f"scale: need {n} bytes at offset {pos}, {self.remaining} left")
        self.pos = pos + n
        return pos

    def read_u16(self) -> int:
        return int(_U16.unpack_from(self.data, self._fixed(2))[0])

    def read_u32(self) -> int:
        return int(_U32.unpack_from(self.data, self._fixed(4))[0])

    def read_u64(self) -> int:
        return int(_U64.unpack_from(self.data, self._fixed(8))[0])

    def read_bool(self) -> bool:
        b = self.read_u8()
        if b > 1:
            raise ParseError(f"scale: invalid bool byte {b}")
        return b == 1

    def read_compact(self) -> int:
        first = self.read_u8()
        mode = first & 0b11
        if mode == 0:
            return first >> 2
        if mode == 1:
            value = (first | self.read_u8() << 8) >> 2
            if value < 1 << 6:
                raise ParseError("scale: non-canonical compact integer")
            return value
        if mode == 2:
            value = (first | int.from_bytes(self.take(3), "little") << 8) >> 2
            if value < 1 << 14:
                raise ParseError("scale: non-canonical compact integer")
            return value
        n = (first >> 2) + 4
        if n > 8:
            raise ParseError("scale: compact integer wider than 64 bits")
        value = int.from_bytes(self.take(n), "little")
        if value < 1 << 30 or value >> (8 * (n - 1)) == 0:
            raise ParseError("scale: non-canonical compact integer")
        return value

    def read_len(self, min_item_size: int = 1) -> int:
        n = self.read_compact()
        if n * min_item_size > len(self.data) - self.pos:
            raise ParseError(f"scale: length {n} exceeds the remaining {self.remaining} bytes")
        return n

    def read_bytes(self) -> bytes:
        data, pos = self.data, self.pos
        if pos < len(data) and not data[pos] & 0b11:
            # the common case, a length under 64 in one byte: read without the general path
            end = pos + 1 + (data[pos] >> 2)
            if end <= len(data):
                self.pos = end
                return data[pos + 1 : end]
        return self.take(self.read_len())

    def read_str(self) -> str:
        raw = self.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ParseError(f"scale: string is not utf-8: {e}") from e

    def read_fixed(self, n: int) -> bytes:
        return self.take(n)

    def read_option(self, read: Callable[[], T]) -> T | None:
        tag = self.read_u8()
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise ParseError(f"scale: invalid option tag {tag}")

    def read_vec(self, read: Callable[[], T], min_item_size: int = 1) -> list[T]:
        return [read() for _ in range(self.read_len(min_item_size))]

    def expect_end(self) -> None:
        if self.remaining:
            raise ParseError(f"scale: {self.remaining} trailing bytes")


class Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self.buf)

    def write_raw(self, data: bytes) -> None:
        self.buf += data

    def write_u8(self, v: int) -> None:
        self.buf += struct.pack("<B", v)

    def write_u16(self, v: int) -> None:
        self.buf += struct.pack("<H", v)

    def write_u32(self, v: int) -> None:
        self.buf += struct.pack("<I", v)

    def write_u64(self, v: int) -> None:
        self.buf += struct.pack("<Q", v)

    def write_bool(self, v: bool) -> None:
        self.write_u8(1 if v else 0)

    def write_compact(self, v: int) -> None:
        if v < 0:
            raise ValueError("scale: compact integers are unsigned")
        if v < 1 << 6:
            self.buf += bytes([v << 2])
        elif v < 1 << 14:
            self.buf += ((v << 2) | 1).to_bytes(2, "little")
        elif v < 1 << 30:
            self.buf += ((v << 2) | 2).to_bytes(4, "little")
        else:
            n = (v.bit_length() + 7) // 8
            if n > 8:
                raise ValueError("scale: compact integer wider than 64 bits")
            self.buf += bytes([((n - 4) << 2) | 3]) + v.to_bytes(n, "little")

    def write_bytes(self, data: bytes) -> None:
        self.write_compact(len(data))
        self.buf += data

    def write_str(self, s: str) -> None:
        self.write_bytes(s.encode("utf-8"))

    def write_option(self, value: T | None, write: Callable[[T], None]) -> None:
        if value is None:
            self.write_u8(0)
        else:
            self.write_u8(1)
            write(value)
