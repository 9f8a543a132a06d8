"""prpc's JSON mapping of protobuf messages.

Keys are the proto field names in field order; every field is present (defaults included);
`bytes` are lowercase hex without `0x` (either case and a `0x` prefix accepted on input);
`repeated bytes` are arrays of hex; `optional` scalars are the value or null; nested messages
are objects when set and null when not (as upstream's prost `Option<Message>` serializes);
`google.protobuf.Empty` is `null`. Missing input fields take their defaults and
unknown ones are ignored.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pydstack.errors import InputError
from pydstack.types import jsonlimits

EMPTY_FULL_NAME = "google.protobuf.Empty"

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


class CodecError(InputError):
    """a JSON request does not fit the message type."""


#: a decimal integer as JSON strings and query values carry it: ascii digits, optional sign
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_INT_TEXT = re.compile(r"-?[0-9]{1,20}")
#: a proto field name (anything else cannot name a field: it is an unknown key)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


#: fields a GET query may carry (counted by its separators before any is decoded)
MAX_QUERY_FIELDS = 100


def _field(fields: Any, key: object) -> Any:
    """the field `key` names, or None; the lookup never sees text the protobuf runtime cannot
    take (lone surrogates raise SystemError there, an embedded NUL matches a shorter name)."""
    if not isinstance(key, str) or not _FIELD_NAME.fullmatch(key):
        return None
    return fields.get(key)


def _utf8(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError(f"field {name}: string is not valid unicode (lone surrogate)") from None
    return value


def _int_text(value: str, name: str) -> int:
    if not _INT_TEXT.fullmatch(value):
        raise CodecError(f"field {name}: expected an integer")
    return int(value)


def _is_repeated(f: Any) -> bool:
    if hasattr(f, "is_repeated"):
        return bool(f.is_repeated)
    return bool(f.label == FieldDescriptor.LABEL_REPEATED)


_KIND_PLAIN, _KIND_BYTES, _KIND_MESSAGE, _KIND_ENUM, _KIND_MAP = range(5)
_KINDS = {
    FieldDescriptor.TYPE_BYTES: _KIND_BYTES,
    FieldDescriptor.TYPE_MESSAGE: _KIND_MESSAGE,
    FieldDescriptor.TYPE_ENUM: _KIND_ENUM,
}
#: per message type, its fields in number order as (name, kind, repeated, has_presence)
_PLANS: dict[str, list[tuple[str, int, bool, bool]]] = {}


def _plan(desc: Any) -> list[tuple[str, int, bool, bool]]:
    plan = _PLANS.get(desc.full_name)
    if plan is None:
        plan = []
        for f in sorted(desc.fields, key=lambda f: f.number):
            kind = _KINDS.get(f.type, _KIND_PLAIN)
            if kind == _KIND_MESSAGE and f.message_type.GetOptions().map_entry:
                # a map: a JSON object with text keys (as serde writes a HashMap)
                plan.append((f.name, _KIND_MAP, False, False))
                continue
            # optional scalars and every singular message (prost's Option) have presence
            plan.append((f.name, kind, _is_repeated(f), bool(f.has_presence)))
        _PLANS[desc.full_name] = plan
    return plan


def _out(kind: int, v: Any) -> Any:
    if kind == _KIND_PLAIN:
        return v
    if kind == _KIND_BYTES:
        return bytes(v).hex()
    if kind == _KIND_MESSAGE:
        return message_to_obj(v)
    return int(v)


def message_to_obj(msg: Message, omit_empty: frozenset[str] = frozenset()) -> Any:
    desc: Any = msg.DESCRIPTOR
    if desc.full_name == EMPTY_FULL_NAME:
        return None
    out: dict[str, Any] = {}
    for name, kind, repeated, presence in _plan(desc):
        value = getattr(msg, name)
        if kind == _KIND_MAP:
            vkind = _KINDS.get(desc.fields_by_name[name].message_type.fields_by_name["value"].type)
            out[name] = {str(k): _out(vkind or _KIND_PLAIN, value[k]) for k in sorted(value)}
        elif repeated:
            out[name] = list(value) if kind == _KIND_PLAIN else [_out(kind, v) for v in value]
        elif presence:
            out[name] = _out(kind, value) if msg.HasField(name) else None
        else:
            out[name] = _out(kind, value)
        if name in omit_empty and not value:
            del out[name]
    return out


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps makes one per call otherwise


def message_to_json(msg: Message, omit_empty: frozenset[str] = frozenset()) -> bytes:
    return _ENCODER.encode(message_to_obj(msg, omit_empty)).encode()


def _hex(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise CodecError(f"field {name}: expected a hex string")
    digits = value.removeprefix("0x").removeprefix("0X")
    # bytes.fromhex would also skip whitespace ("de ad"): hex digits only, as serde's hex reads
    if not _HEX.fullmatch(digits):
        raise CodecError(f"field {name}: invalid hex")
    return bytes.fromhex(digits)


def _scalar_in(f: Any, value: Any, msg_cls: Callable[[], Message] | None) -> Any:
    name = f.name
    t = f.type
    if t == FieldDescriptor.TYPE_BYTES:
        return _hex(value, name)
    if t == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise CodecError(f"field {name}: expected a string")
        return _utf8(value, name)
    if t == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise CodecError(f"field {name}: expected a boolean")
        return value
    if t in _INT_TYPES or t == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, str):
            value = _int_text(value, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CodecError(f"field {name}: expected an integer")
        lo, hi = _INT_RANGES.get(t, (-(2**31), 2**31 - 1))
        if not lo <= value <= hi:
            raise CodecError(f"field {name}: integer out of range")
        return value
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CodecError(f"field {name}: expected a number")
        return float(value)
    raise CodecError(f"field {name}: unsupported type")


def obj_to_message(obj: Any, msg: Message) -> Message:
    """fill `msg` from a decoded JSON value (object, or null for defaults)."""
    if obj is None:
        return msg
    if not isinstance(obj, dict):
        raise CodecError(f"expected a json object for {msg.DESCRIPTOR.name}")
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in obj.items():
        f = _field(fields, key)
        if f is None or value is None:
            continue
        key = f.name
        if _is_repeated(f):
            if not isinstance(value, list):
                raise CodecError(f"field {key}: expected an array")
            target = getattr(msg, key)
            for item in value:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    obj_to_message(item, target.add())
                else:
                    target.append(_scalar_in(f, item, None))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            obj_to_message(value, getattr(msg, key))
        else:
            setattr(msg, key, _scalar_in(f, value, None))
    return msg


def json_to_message(body: bytes, msg: Message) -> Message:
    """fill `msg` from a prpc JSON body (blank: defaults). CodecError for anything that does
    not fit: JSON refused by `jsonlimits.loads` (UTF-8 only, 64 levels, 250,000 values), a
    value of the wrong type, an integer out of its field's range, hex that is not hex, a lone
    surrogate in a string. Unknown keys are ignored. Linear time and memory."""
    if not body.strip() or body == b"{}":  # the usual body of a call without arguments
        return msg
    try:
        # utf-8 only, nesting and item count bounded before anything is built
        obj = jsonlimits.loads(body)
    except ValueError as e:
        raise CodecError(f"invalid json: {e}") from e
    return obj_to_message(obj, msg)


def query_to_message(query: str, msg: Message) -> Message:
    """the GET form: `?field=value&...` (repeated fields as repeated keys or `f[]`).
    CodecError as `json_to_message`, and for more than MAX_QUERY_FIELDS fields (counted
    before any is decoded); linear time and memory."""
    obj: dict[str, Any] = {}
    fields = msg.DESCRIPTOR.fields_by_name
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
        )
    except ValueError as e:  # the only ValueError parse_qsl raises here: the field count
        raise CodecError(f"more than {MAX_QUERY_FIELDS} query fields") from e
    for key, value in pairs:
        f = _field(fields, key.removesuffix("[]"))
        if f is None:
            continue
        key = f.name
        parsed: Any = value
        if f.type == FieldDescriptor.TYPE_BOOL:
            if value not in ("true", "false", "1", "0", ""):
                raise CodecError(f"field {key}: expected a boolean")
            parsed = value in ("true", "1")
        elif f.type in _INT_TYPES:
            parsed = _int_text(value, key)
        if _is_repeated(f):
            obj.setdefault(key, []).append(parsed)
        else:
            obj[key] = parsed
    return obj_to_message(obj, msg)
