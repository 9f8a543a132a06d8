"""ports and decimal counts as peers and configs write them: ASCII digits only.

`str.isdigit()` is true of characters that are not ASCII digits. Some int() refuses (a
superscript two, which a header decoded as latin-1 reads from the byte 0xb2: a ValueError where
the caller expected a checked value) and some it reads (the Arabic-Indic digits of `٨٠` are 80:
a second spelling of a port, past any check of the first). Every port and decimal field read
from outside goes through these two functions, which accept `[0-9]{1,n}` and nothing else.
"""

from __future__ import annotations


def ascii_decimal(text: str, max_digits: int) -> int | None:
    """`text` as a non-negative integer of 1 to `max_digits` ASCII digits, else None."""
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def parse_port(text: str, *, allow_zero: bool = False) -> int | None:
    """a TCP/UDP port of 1 to 5 ASCII digits, 1..65535 (0..65535 with `allow_zero`), else
    None; callers raise their own error naming the field."""
    port = ascii_decimal(text, 5)
    if port is None or port > 65535 or (port == 0 and not allow_zero):
        return None
    return port
