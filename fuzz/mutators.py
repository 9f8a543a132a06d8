"""format-aware mutators for the fuzz targets.

A mutator takes the input, a seeded `random.Random` and a pool of other inputs (seeds and
corpus entries seen lately, for splicing) and returns a new input. They aim where parsers of
peer input break: length fields that claim more or less than there is, item counts, deep
nesting, text that is not what the parser expects (lone surrogates, UTF-16/32), YAML features
that expand or execute, and DER trees with duplicated or cut nodes. `custom_mutator` in
:mod:`fuzz.harness` chains one to three of a target's mutators, with libFuzzer's own
`atheris.Mutate` before or after them. Every mutator is total: any input, any output.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Mutator = Callable[[bytes, random.Random, Sequence[bytes]], bytes]

#: values a length or count field is set to: boundaries, the input's own size, huge
_BIG = (0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _replace(data: bytes, pos: int, width: int, new: bytes) -> bytes:
    return data[:pos] + new + data[pos + width :]


def _length_candidates(
    data: bytes, width: int, order: str, rng: random.Random
) -> list[tuple[int, int]]:
    """positions of plausible length fields: a `width`-byte integer whose value is positive
    and fits in what follows it."""
    out = []
    n = len(data)
    for pos in _positions(n - width + 1, rng):
        v = int.from_bytes(data[pos : pos + width], order)  # type: ignore[arg-type]
        if 0 < v <= n - pos - width:
            out.append((pos, v))
    return out


def _positions(n: int, rng: random.Random, sample: int = 128) -> range | list[int]:
    """every position below `n`, or an ordered random sample of them for long inputs."""
    if n <= sample:
        return range(max(n, 0))
    return sorted(rng.sample(range(n), sample))


def _length_field(data: bytes, rng: random.Random, grow: bool) -> bytes:
    if len(data) < 2:
        return data + bytes([rng.randrange(256)])
    width = rng.choice((1, 2, 2, 4, 4, 4))
    order = rng.choice(("little", "little", "big"))
    if len(data) < width:
        width = 1
    candidates = _length_candidates(data, width, order, rng)
    if candidates and rng.random() < 0.9:
        pos, v = rng.choice(candidates)
    else:
        pos = rng.randrange(len(data) - width + 1)
        v = int.from_bytes(data[pos : pos + width], order)  # type: ignore[arg-type]
    limit = (1 << (8 * width)) - 1
    if grow:
        choices = [v + 1, v * 2, len(data), len(data) - pos, v + rng.randrange(1, 64)]
        choices += [b for b in _BIG if b <= limit]
    else:
        choices = [0, max(v - 1, 0), v // 2, rng.randrange(v + 1)]
    new = min(rng.choice(choices), limit)
    return _replace(data, pos, width, new.to_bytes(width, order))  # type: ignore[arg-type]


def length_inflate(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a u8/u16/u32 (LE or BE) length field claims more than follows it."""
    return _length_field(data, rng, grow=True)


def length_shrink(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a u8/u16/u32 (LE or BE) length field claims less than follows it."""
    return _length_field(data, rng, grow=False)


# -- SCALE compact integers -----------------------------------------------------------------


def _compact_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, width) of a canonical SCALE compact integer at `pos`, or None."""
    first = data[pos]
    mode = first & 3
    if mode == 0:
        return first >> 2, 1
    width = {1: 2, 2: 4}.get(mode, (first >> 2) + 5)
    if pos + width > len(data) or width > 9:
        return None
    if mode in (1, 2):
        return int.from_bytes(data[pos : pos + width], "little") >> 2, width
    return int.from_bytes(data[pos + 1 : pos + width], "little"), width


def encode_compact(v: int, width: int | None = None) -> bytes:
    """SCALE compact encoding of `v`; `width` forces a (possibly non-canonical) form."""
    if width is None:
        width = 1 if v < 1 << 6 else 2 if v < 1 << 14 else 4 if v < 1 << 30 else 0
    if width == 1 and v < 1 << 6:
        return bytes([v << 2])
    if width == 2 and v < 1 << 14:
        return ((v << 2) | 1).to_bytes(2, "little")
    if width == 4 and v < 1 << 30:
        return ((v << 2) | 2).to_bytes(4, "little")
    n = max(4, (v.bit_length() + 7) // 8)
    return bytes([((n - 4) << 2) | 3]) + v.to_bytes(n, "little")


def compact_length(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a SCALE compact length or count made larger, smaller, huge or non-canonical."""
    if not data:
        return encode_compact(rng.choice(_BIG))
    candidates = []
    for pos in _positions(len(data), rng):
        got = _compact_at(data, pos)
        if got is not None and 0 < got[0] <= len(data) - pos:
            candidates.append((pos, got))
    if not candidates:
        pos = rng.randrange(len(data))
        return _replace(data, pos, 1, encode_compact(rng.choice(_BIG)))
    pos, (v, width) = rng.choice(candidates)
    how = rng.randrange(5)
    if how == 0:
        new = encode_compact(v + rng.choice((1, 2, 64, len(data))))
    elif how == 1:
        new = encode_compact(max(v - rng.randrange(1, v + 1), 0))
    elif how == 2:
        new = encode_compact(rng.choice((*_BIG, 1 << 40, (1 << 64) - 1)))
    elif how == 3:  # the same value in a wider form than needed
        new = encode_compact(v, rng.choice((2, 4, 0)))
    else:  # a count repeated: the item after the length copied many times
        return data[: pos + width] + data[pos + width : pos + width + 8] * rng.randrange(2, 64)
    return _replace(data, pos, width, new)


# -- msgpack ---------------------------------------------------------------------------------

_MSGPACK_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4}
_MSGPACK_LEN |= {0xDE: 2, 0xDF: 4}
_MSGPACK_HEAD = re.compile(rb"[\xc4-\xc6\xd9-\xdf\x80-\xbf]")


def msgpack_length(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a msgpack array/map/str/bin header claims more or fewer items or bytes."""
    heads = [h.start() for h in _MSGPACK_HEAD.finditer(data)]
    if not heads:
        return data + bytes([rng.choice((0xDD, 0xDF, 0xC6))]) + b"\xff\xff\xff\xff"
    pos = rng.choice(heads)
    head = data[pos]
    if head in _MSGPACK_LEN:
        width = _MSGPACK_LEN[head]
        limit = (1 << (8 * width)) - 1
        new = min(rng.choice((*_BIG, 0, 1, len(data))), limit)
        return _replace(data, pos + 1, width, new.to_bytes(width, "big"))
    # a fix type (0x80 map, 0x90 array, 0xa0 str) turned into its 32-bit form with a huge count
    kind = {0x80: 0xDF, 0x90: 0xDD, 0xA0: 0xDB, 0xB0: 0xDB}[head & 0xF0]
    count = rng.choice((0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, (head & 0x0F) + 1))
    return _replace(data, pos, 1, bytes([kind]) + count.to_bytes(4, "big"))


# -- generic ---------------------------------------------------------------------------------


def splice(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """the head of this input and the tail of another (or a chunk of it inserted)."""
    if not pool:
        return data
    other = rng.choice(pool)
    i = rng.randrange(len(data) + 1)
    j = rng.randrange(len(other) + 1)
    if rng.random() < 0.5:
        return data[:i] + other[j:]
    k = rng.randrange(j, len(other) + 1)
    return data[:i] + other[j:k] + data[i:]


def repeat_chunk(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a chunk repeated many times in place (item counts, long runs of one byte)."""
    if not data:
        return data
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 32))
    return data[:j] + data[i:j] * rng.choice((2, 8, 64, 512, 4096)) + data[j:]


def truncate(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """the input cut short."""
    return data[: rng.randrange(len(data) + 1)]


def token_insert(tokens: Sequence[bytes]) -> Mutator:
    """a mutator that puts one of `tokens` (field names, keywords) at a random place, or in
    place of a random span."""

    def mutate(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
        if not tokens:
            return data
        tok = rng.choice(tokens)
        i = rng.randrange(len(data) + 1)
        if rng.random() < 0.5:
            return data[:i] + tok + data[i:]
        j = min(len(data), i + rng.randrange(0, 16))
        return data[:i] + tok + data[j:]

    mutate.__name__ = "token_insert"
    return mutate


# -- text ------------------------------------------------------------------------------------

_NEST_OPEN = (b"[", b'{"a":', b"- ", b"[[", b"{a: ", b"!!seq [")
_NEST_CLOSE = {b"[": b"]", b'{"a":': b"}", b"- ": b"", b"[[": b"]]", b"{a: ": b"}"}
_NEST_CLOSE[b"!!seq ["] = b"]"


def deep_nesting(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a value nested tens to thousands of levels deep, balanced or not."""
    n = rng.choice((63, 64, 65, 100, 1000, 20000))
    opener = rng.choice(_NEST_OPEN)
    closer = _NEST_CLOSE[opener]
    i = rng.randrange(len(data) + 1)
    if opener == b"- ":  # block sequences nest by indentation
        nested = b"".join(b"  " * k + b"-\n" for k in range(min(n, 300)))
        return data[:i] + b"\n" + nested + data[i:]
    inner = rng.choice((b"1", b'"x"', b"", b"null"))
    tail = closer * n if rng.random() < 0.8 else b""
    return data[:i] + opener * n + inner + tail + data[i:]


_SURROGATES = (
    b"\\ud800",
    b"\\udfff",
    b"\\udc80",
    b"\\ud83d\\ude00",
    b"\\ud83d",
    b"\\u0000",
    b"\xed\xa0\x80",  # a surrogate encoded as UTF-8 (surrogatepass): invalid UTF-8
    b"\xed\xbf\xbf",
    b"\xc0\x80",  # overlong NUL
    b"\xff",
    b"\x00",
    "\u2028".encode(),
    "\ufeff".encode(),
)


def lone_surrogates(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a lone surrogate (as a JSON escape or as surrogatepass UTF-8), NUL, or an invalid or
    odd code point, put inside a string literal where there is one."""
    quotes = [m.end() for m in re.finditer(rb'"', data)]
    i = rng.choice(quotes) if quotes and rng.random() < 0.7 else rng.randrange(len(data) + 1)
    return data[:i] + rng.choice(_SURROGATES) + data[i:]


_ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig")


def reencode(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """the text re-encoded as UTF-16 or UTF-32 (with or without a BOM), or with a UTF-8 BOM."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        return text.encode(rng.choice(_ENCODINGS), "surrogatepass")
    except UnicodeEncodeError:
        return b"\xef\xbb\xbf" + data


_YAML_SNIPPETS = (
    b"&a ",
    b"*a",
    b"&b [*a, *a, *a, *a, *a, *a, *a, *a, *a]",
    b"<<: *a\n",
    b"<<: [*a, *b]\n",
    b"!!str ",
    b"!!int ",
    b"!!float ",
    b"!!bool ",
    b"!!null ",
    b"!!binary ",
    b"!!set ",
    b"!!timestamp ",
    b"!!omap ",
    b"!!python/object/apply:os.system ",
    b"!!python/name:os.system ",
    b"!custom ",
    b"! ",
    b"!!merge ",
    b"? [a, b]\n: c\n",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n---\n",
    b"%TAG ! tag:yaml.org,2002:\n---\n",
    b"2001-02-30",
    b"22:22",
    b"0o777",
    b"0x1F",
    b".inf",
    b"1" * 5000,
    b"yes",
    b"~",
    b"${A}",
    b"${A:-${B:-${C}}}",
    b"$$",
    b"${",
)
_LAUGHS = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((98 + i, 98 + i) + (97 + i,) * 9)
    for i in range(9)
)


def yaml_features(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """YAML anchors, aliases (to earlier anchors, or expanding ones), merge keys, tags of
    every kind, documents and directives, put at a line start or after a `: `."""
    if rng.random() < 0.05:
        return _LAUGHS + data
    spots = [m.end() for m in re.finditer(rb"(?m)^\s*(?:- )?|: ", data)] or [0]
    i = rng.choice(spots)
    snippet = rng.choice(_YAML_SNIPPETS)
    anchors = re.findall(rb"&([A-Za-z0-9_]+)", data)
    if anchors and rng.random() < 0.3:
        snippet = b"*" + rng.choice(anchors)
    return data[:i] + snippet + data[i:]


# -- JSON trees ------------------------------------------------------------------------------

_JSON_VALUES: tuple[object, ...] = (
    None,
    True,
    0,
    -1,
    2**64,
    10**400,
    1.5e308,
    "",
    "x" * 300,
    "0x",
    "zz",
    "\ud800",
    [],
    {},
    [[[[[[]]]]]],
    "-1",
    "18446744073709551616",
)


def _walk(node: Any, out: list[tuple[Any, Any]], depth: int = 0) -> None:
    if depth > 64 or len(out) > 2000:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            _walk(v, out, depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            _walk(v, out, depth + 1)


def json_tree(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """if the input is JSON, one of its values replaced (by another type, a boundary number, a
    long or odd string), repeated many times, or its key duplicated; then serialised again."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return data
    spots: list[tuple[Any, Any]] = []
    _walk(doc, spots)
    if not spots:
        return json.dumps(rng.choice(_JSON_VALUES)).encode()
    parent, key = rng.choice(spots)
    how = rng.randrange(4)
    if how == 0:
        parent[key] = rng.choice(_JSON_VALUES)
    elif how == 1 and isinstance(parent, list):  # repeated, to about 128 KiB at most
        size = len(json.dumps(parent[key])) + 1
        parent.extend([parent[key]] * min(rng.choice((10, 1000, 70000)), (1 << 17) // size))
    elif how == 2 and isinstance(parent, dict):
        parent[str(key) + "\u0000"] = parent[key]
        parent[str(key).upper()] = parent[key]
    else:
        parent[key] = [parent[key]] if rng.random() < 0.5 else {"a": parent[key]}
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    if how == 2 and rng.random() < 0.5:  # a key written twice in one object
        text = text.replace("{", '{"' + str(key)[:32].replace('"', "") + '": 1, ', 1)
    return text.encode("utf-8", "surrogatepass")


# -- query strings ---------------------------------------------------------------------------


def query_parts(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a query string's pairs repeated, percent-encoded oddly, or given `[]` suffixes."""
    pairs = data.split(b"&")
    i = rng.randrange(len(pairs))
    how = rng.randrange(5)
    if how == 0:
        pairs += [pairs[i]] * rng.choice((2, 100, 5000))
    elif how == 1:
        pairs[i] = pairs[i].replace(b"=", b"[]=", 1)
    elif how == 2:
        pairs.insert(i, rng.choice((b"%ED%A0%80", b"%00", b"%FF", b"%C0%80", b"%", b"%Z")))
    elif how == 3:
        pairs[i] = pairs[i] + b"=" + rng.choice((b"-", b"--1", b"+1", b"1_0", b"\xd9\xa1"))
    else:
        pairs[i] = b"".join(b"%%%02X" % c for c in pairs[i])
    return b"&".join(pairs)


# -- DER -------------------------------------------------------------------------------------


@dataclass
class DerNode:
    """one TLV; `children` when constructed (or an OCTET/BIT STRING that wraps DER)."""

    tag: bytes
    content: bytes
    children: list[DerNode] | None = None
    prefix: bytes = b""  # a BIT STRING's unused-bits byte before wrapped DER
    extra: list[DerNode] = field(default_factory=list)

    def encode(self) -> bytes:
        if self.children is None:
            body = self.content
        else:
            body = self.prefix + b"".join(c.encode() for c in self.children)
        return self.tag + der_length(len(body)) + body


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_header(data: bytes, pos: int) -> tuple[bytes, int, int] | None:
    """(tag, content start, content length) of the TLV at `pos`, or None."""
    if pos + 2 > len(data):
        return None
    start = pos + 1
    if data[pos] & 0x1F == 0x1F:  # high tag number form
        while start < len(data) and data[start] & 0x80:
            start += 1
        start += 1
    if start >= len(data):
        return None
    first = data[start]
    if first < 0x80:
        return data[pos:start], start + 1, first
    n = first & 0x7F
    if n == 0 or n > 4 or start + 1 + n > len(data):
        return None
    return data[pos:start], start + 1 + n, int.from_bytes(data[start + 1 : start + 1 + n], "big")


def parse_der(data: bytes, depth: int = 0) -> list[DerNode] | None:
    """the TLVs filling `data` exactly, or None if it is not DER of definite lengths."""
    out: list[DerNode] = []
    pos = 0
    while pos < len(data):
        head = _der_header(data, pos)
        if head is None or depth > 24 or len(out) > 512:
            return None
        tag, start, length = head
        end = start + length
        if end > len(data):
            return None
        content = data[start:end]
        node = DerNode(tag, content)
        if tag[0] & 0x20:
            node.children = parse_der(content, depth + 1)
            if node.children is None:
                return None
        elif tag[0] == 0x04 and content:  # an OCTET STRING that wraps DER (extension values)
            node.children = parse_der(content, depth + 1) if content[0] in (0x30, 0x04) else None
        elif tag[0] == 0x03 and len(content) > 1 and content[0] == 0 and content[1] == 0x30:
            inner = parse_der(content[1:], depth + 1)
            if inner is not None:
                node.children, node.prefix = inner, content[:1]
        out.append(node)
        pos = end
    return out


def _nodes(roots: list[DerNode]) -> list[tuple[list[DerNode], int]]:
    """every node as (its sibling list, its index), depth first."""
    out: list[tuple[list[DerNode], int]] = []
    stack = [roots]
    while stack:
        siblings = stack.pop()
        for i, node in enumerate(siblings):
            out.append((siblings, i))
            if node.children:
                stack.append(node.children)
    return out


def der_nodes(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """a node of the DER tree duplicated, deleted, cut short, or replaced by a node of another
    input (lengths fixed up to the root), or the encoding broken at a node (length claims
    more, non-minimal length form, indefinite length)."""
    roots = parse_der(data)
    if not roots:
        return truncate(data, rng, pool)
    spots = _nodes(roots)
    siblings, i = rng.choice(spots)
    node = siblings[i]
    how = rng.randrange(7)
    if how == 0:
        siblings.insert(i + 1, DerNode(node.tag, node.content, node.children, node.prefix))
    elif how == 1 and len(spots) > 1:
        del siblings[i]
    elif how == 2:
        if node.children:
            node.children = node.children[: rng.randrange(len(node.children))]
        else:
            node.content = node.content[: rng.randrange(len(node.content) + 1)]
    elif how == 3 and pool:
        other = parse_der(rng.choice(pool))
        if other:
            o_siblings, o_i = rng.choice(_nodes(other))
            siblings[i] = o_siblings[o_i]
    elif how == 4:  # a length that claims more than there is (no fix-up)
        out = b"".join(r.encode() for r in roots)
        enc = node.encode()
        at = out.find(enc)
        if at >= 0:
            bad = node.tag + b"\x84" + (len(enc) + rng.choice((1, 255, 1 << 20))).to_bytes(4, "big")
            return out[:at] + bad + out[at + len(node.tag) + len(der_length(len(enc))) :]
    elif how == 5:  # a valid length in a non-minimal (BER) form
        out = b"".join(r.encode() for r in roots)
        enc = node.encode()
        at = out.find(enc)
        if at >= 0:
            head = len(node.tag) + len(der_length(len(enc) - len(node.tag)))
            body = enc[head:]
            return (
                out[:at]
                + node.tag
                + b"\x82"
                + len(body).to_bytes(2, "big")
                + body
                + out[at + len(enc) :]
            )
    else:  # the node's content replaced by a boundary value
        node.children = None
        node.content = rng.choice((b"", b"\x00", b"\xff" * 9, b"\x80", node.content * 2))
    return b"".join(r.encode() for r in roots)


BINARY: tuple[Mutator, ...] = (length_inflate, length_shrink, splice, repeat_chunk, truncate)
TEXT: tuple[Mutator, ...] = (deep_nesting, lone_surrogates, reencode, splice, repeat_chunk)
JSON: tuple[Mutator, ...] = (*TEXT, json_tree, json_tree)
YAML: tuple[Mutator, ...] = (*TEXT, yaml_features, yaml_features, yaml_features)
SCALE: tuple[Mutator, ...] = (*BINARY, compact_length, compact_length, lone_surrogates)
MSGPACK: tuple[Mutator, ...] = (*BINARY, msgpack_length, msgpack_length, lone_surrogates)
DER: tuple[Mutator, ...] = (der_nodes, der_nodes, der_nodes, length_inflate, splice, truncate)
QUERY: tuple[Mutator, ...] = (query_parts, query_parts, lone_surrogates, splice, repeat_chunk)
