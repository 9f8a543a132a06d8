"""YAML from untrusted sources, loaded with its size, expansion and depth bounded.

Every YAML document the project reads goes through `load`. The contract:

- input: `str`, or `bytes` that must be valid UTF-8 (no UTF-16/32 detection); a str with lone
  surrogates is refused. At most `max_bytes` UTF-8 bytes, checked before parsing.
- one document (an empty stream loads as None); the result is built only from `None`, `bool`,
  `int`, `float`, `str`, `list` and `dict` with `str` keys. Where the document uses aliases the
  result shares the aliased object: treat it as read-only.
- scalars resolve by the YAML 1.2 core schema, as docker compose's parser does: `true`/`false`,
  `null`/`~`/empty, decimal, `0o` and `0x` integers, floats with `.inf`/`.nan`; everything else,
  timestamps (`2001-02-30`), sexagesimal `22:22` and `yes`/`no`/`on`/`off` included, is a string.
- tags: only `!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!seq`, `!!map` and `!!merge`
  (and the non-specific `!`, which makes a scalar a string); an explicitly tagged scalar must
  be written the way the plain form of that type is (`!!int x` is refused). Any other tag
  (`!!python/...`, `!!binary`, `!!set`, `!!timestamp`, custom `!foo`) is refused.
- mapping keys are scalars taken as their text (`1: a` has the key "1"); a key with an explicit
  tag other than `!!str` or an anchor, or a sequence, mapping or alias as a key, is refused,
  and so is a key written twice in one mapping. Merge keys (`<<: *base`, `<<: [*a, *b]`) are
  supported: the mapping's own keys win over merged ones, earlier merged mappings over later.
- aliases are expanded by counting, never by building: the document may hold at most
  `max_nodes` nodes counted as if every alias were replaced by a copy of its anchor, and nest
  at most `max_depth` collections deep, counting through aliases. An alias to a node still
  being built (a recursive structure) is refused.
- every bad input raises `YamlError` (a `ValueError`), whose message quotes at most ~100
  characters of the input.

Cost: one pass over the parser's events with O(1) work per event, and loading stops at the
first limit crossed, so the worst case is O(len(input)) time and O(max_nodes) memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias

import yaml
from yaml import events as ev

from pydstack.errors import InputError

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NODES = 100_000
DEFAULT_MAX_DEPTH = 64
MAX_QUOTE = 100

YamlValue: TypeAlias = "bool | int | float | str | list[YamlValue] | dict[str, YamlValue] | None"

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP, _MERGE = _TAG + "seq", _TAG + "map", _TAG + "merge"
_NULL_RE = re.compile(r"(?:~|null|Null|NULL|)\Z")
_BOOL_RE = re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z")
_INT_RE = re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
_FLOAT_RE = re.compile(
    r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"
)
_MAX_INT_CHARS = 1000
_LOADER = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


class YamlError(InputError):
    """the YAML input is malformed, too large, too deep, or uses a refused feature."""


def quote(text: str, limit: int = MAX_QUOTE) -> str:
    """`text` as a repr, cut to about `limit` characters (for error messages)."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _clip(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _utf8(data: str | bytes, max_bytes: int) -> str:
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise YamlError(f"yaml exceeds {max_bytes} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"yaml must be utf-8 (invalid byte at offset {e.start})") from None
    if len(data) > max_bytes:  # a character is at least one byte
        raise YamlError(f"yaml exceeds {max_bytes} bytes")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise YamlError(f"yaml contains a lone surrogate at offset {e.start}") from None
    if size > max_bytes:
        raise YamlError(f"yaml exceeds {max_bytes} bytes")
    return data


def _plain(value: str) -> YamlValue:
    """a plain (unquoted, untagged) scalar by the YAML 1.2 core schema."""
    if _NULL_RE.match(value):
        return None
    if _BOOL_RE.match(value):
        return value[0] in "tT"
    if _INT_RE.match(value):
        return _int(value)
    if _FLOAT_RE.match(value):
        return float(value.replace(".", "") if value[-1] in "fFnN" else value)  # .inf, .nan
    return value


def _int(value: str) -> int:
    if len(value) > _MAX_INT_CHARS:
        raise YamlError(f"integer {quote(value, 20)} is too long")
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)


def _tagged(tag: str, value: str) -> YamlValue:
    """an explicitly tagged scalar: the tag must be one we allow, the text valid for it."""
    if tag in ("!", _STR):
        return value
    checks = {_INT: _INT_RE, _FLOAT: _FLOAT_RE, _BOOL: _BOOL_RE, _NULL: _NULL_RE}
    pattern = checks.get(tag)
    if pattern is None:
        raise YamlError(f"yaml tag {quote(tag, 40)} is not allowed")
    if not pattern.match(value):
        raise YamlError(f"{quote(value)} is not a valid {tag.removeprefix(_TAG)}")
    return _plain(value)


def _scalar(event: ev.ScalarEvent) -> YamlValue:
    value = event.value
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise YamlError("yaml scalar contains a lone surrogate") from None
    if event.tag is None:
        return _plain(value) if event.implicit[0] else value
    return _tagged(event.tag, value)


@dataclass
class _Built:
    """a finished node: its value, expanded node count and height (for aliases)."""

    value: YamlValue
    size: int
    height: int


@dataclass
class _Frame:
    """a collection being built."""

    anchor: str | None
    items: list[YamlValue] | None = None  # a sequence
    own: dict[str, YamlValue] | None = None  # a mapping's own keys
    merged: list[dict[str, YamlValue]] = field(default_factory=list)
    key: str | None = None  # a mapping's key awaiting its value
    merge_next: bool = False
    size: int = 1
    height: int = 1


class _Builder:
    def __init__(self, max_nodes: int, max_depth: int) -> None:
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.total = 0
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Built] = {}
        self.building: set[str] = set()
        self.result: _Built | None = None
        self.documents = 0

    def count(self, n: int) -> None:
        self.total += n
        if self.total > self.max_nodes:
            raise YamlError(f"yaml expands to more than {self.max_nodes} nodes (through aliases)")

    def feed(self, event: ev.Event) -> None:
        if isinstance(event, ev.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise YamlError("yaml holds more than one document")
        elif isinstance(event, ev.ScalarEvent):
            top = self.stack[-1] if self.stack else None
            if top is not None and top.own is not None and top.key is None:
                self.key(top, event)
                return
            self.count(1)
            self.finish(_Built(_scalar(event), 1, 0), event.anchor)
        elif isinstance(event, ev.AliasEvent):
            self.alias(event.anchor or "")
        elif isinstance(event, (ev.SequenceStartEvent, ev.MappingStartEvent)):
            self.open(event)
        elif isinstance(event, (ev.SequenceEndEvent, ev.MappingEndEvent)):
            self.close()

    def key(self, frame: _Frame, event: ev.ScalarEvent) -> None:
        assert frame.own is not None
        text = event.value
        self.count(1)
        if event.tag == _MERGE or (event.tag is None and event.implicit[0] and text == "<<"):
            if frame.merge_next or frame.merged:
                raise YamlError("yaml mapping has more than one merge key")
            frame.merge_next, frame.key = True, ""
            return
        if event.tag not in (None, "!", _STR):
            raise YamlError(f"yaml mapping key {quote(text)} must be a plain string")
        if event.anchor is not None:
            raise YamlError(f"yaml mapping key {quote(text)} carries an anchor")
        _scalar(event)  # the same text checks as for values
        if text in frame.own:
            raise YamlError(f"yaml mapping has the key {quote(text)} twice")
        frame.key = text

    def alias(self, anchor: str) -> None:
        top = self.stack[-1] if self.stack else None
        if top is not None and top.own is not None and top.key is None:
            raise YamlError(f"yaml alias *{anchor[:MAX_QUOTE]} cannot be a mapping key")
        if anchor in self.building:
            raise YamlError(f"yaml alias *{anchor[:MAX_QUOTE]} is recursive")
        built = self.anchors.get(anchor)
        if built is None:
            raise YamlError(f"yaml alias *{anchor[:MAX_QUOTE]} has no anchor before it")
        if len(self.stack) + built.height > self.max_depth:
            raise YamlError(f"yaml nests deeper than {self.max_depth} levels (through aliases)")
        self.count(built.size)
        self.finish(built, None)

    def open(self, event: ev.SequenceStartEvent | ev.MappingStartEvent) -> None:
        top = self.stack[-1] if self.stack else None
        if top is not None and top.own is not None and top.key is None:
            raise YamlError("yaml mapping keys must be strings, not collections")
        is_map = isinstance(event, ev.MappingStartEvent)
        if event.tag not in (None, "!", _MAP if is_map else _SEQ):
            raise YamlError(f"yaml tag {quote(event.tag or '', 40)} is not allowed here")
        if len(self.stack) + 1 > self.max_depth:
            raise YamlError(f"yaml nests deeper than {self.max_depth} levels")
        self.count(1)
        if event.anchor is not None:
            self.building.add(event.anchor)
        if is_map:
            self.stack.append(_Frame(event.anchor, own={}))
        else:
            self.stack.append(_Frame(event.anchor, items=[]))

    def close(self) -> None:
        frame = self.stack.pop()
        value: YamlValue
        if frame.items is not None:
            value = frame.items
        else:
            assert frame.own is not None
            value = {}
            for m in reversed(frame.merged):
                value.update(m)
            value.update(frame.own)
        if frame.anchor is not None:
            self.building.discard(frame.anchor)
        self.finish(_Built(value, frame.size, frame.height), frame.anchor)

    def finish(self, built: _Built, anchor: str | None) -> None:
        """hand a finished node to its parent (or make it the document)."""
        if anchor is not None:
            self.anchors[anchor] = built
        if not self.stack:
            self.result = built
            return
        top = self.stack[-1]
        top.size += built.size
        top.height = max(top.height, built.height + 1)
        if top.items is not None:
            top.items.append(built.value)
            return
        assert top.own is not None and top.key is not None
        if top.merge_next:
            top.merged = _merge_sources(built.value)
            top.merge_next = False
        else:
            top.own[top.key] = built.value
        top.key = None


def _merge_sources(value: YamlValue) -> list[dict[str, YamlValue]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [v for v in value if isinstance(v, dict)]
    raise YamlError("yaml merge key needs a mapping or a list of mappings")


def load(
    data: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> YamlValue:
    """parse one YAML document under the limits in the module docstring; YamlError if not."""
    text = _utf8(data, max_bytes)
    builder = _Builder(max_nodes, max_depth)
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            builder.feed(event)
    except yaml.YAMLError as e:
        raise YamlError(f"not valid yaml: {_clip(str(e))}") from None
    return None if builder.result is None else builder.result.value
