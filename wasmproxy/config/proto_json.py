"""Proto3-JSON values (from YAML or JSON) -> protobuf messages, with the field path in every error.

``google.protobuf.json_format`` does the same job but reports paths inconsistently (often the
parent message, sometimes none) and needs every ``@type`` imported in advance. This walker
follows the proto3 JSON mapping as Envoy's parser applies it, resolves ``Any`` types through the
lazy :mod:`wasmproxy.config.type_index`, and words errors like Envoy 1.40, with the path in front:

    static_resources.clusters[0].type: Protobuf message (type envoy.config.cluster.v3.Cluster
    reason INVALID_ARGUMENT: unknown enum value: 'BOGUS') has unknown fields
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from wasmproxy.config import type_index
from wasmproxy.config.errors import ConfigError

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}
_ATOB = {**dict.fromkeys(("true", "t", "yes", "y", "1"), True), **dict.fromkeys(("false", "f", "no", "n", "0"), False)}
_FLOAT32_MAX = 3.4028234663852886e38
_DURATION = re.compile(r"^(-?)(\d+)(?:\.(\d{1,9}))?s$")
_MAX_DURATION_SECONDS = 315_576_000_000  # google/protobuf/duration.proto: +-10,000 years
_WRAPPERS = frozenset(f"google.protobuf.{n}Value" for n in
                      ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes"))
_JSON_PASSTHROUGH = frozenset(("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
                               "google.protobuf.Timestamp", "google.protobuf.FieldMask"))

_fields_cache: dict[str, dict[str, FieldDescriptor]] = {}


def join(path: str, name: str) -> str:
    """Append a field name to a dotted path."""
    return f"{path}.{name}" if path else name


def parse_into(value: Any, message: Message, path: str = "") -> None:
    """Merge the JSON-like ``value`` into ``message``; ConfigError names the offending field."""
    try:
        _parse_message(value, message, path)
    except RecursionError:
        raise ConfigError("config is nested too deeply to parse", path) from None


def unknown_field_error(path: str, message_type: str, key: str) -> ConfigError:
    return ConfigError(f"Protobuf message (type {message_type} reason INVALID_ARGUMENT: no such field: "
                       f"'{key}') has unknown fields", path)


def invalid_value(path: str, what: str, detail: str) -> ConfigError:
    return ConfigError(f"Unable to parse JSON as proto (INVALID_ARGUMENT: {what}: {detail})", path)


def describe(value: Any) -> str:
    """A JSON value as an error message shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    by_name = _fields_cache.get(descriptor.full_name)
    if by_name is None:
        by_name = {}
        for field in descriptor.fields:
            by_name[field.json_name] = field
            by_name[field.name] = field
        _fields_cache[descriptor.full_name] = by_name
    return by_name


def _parse_message(value: Any, message: Message, path: str) -> None:
    descriptor = message.DESCRIPTOR
    special = _WELL_KNOWN.get(descriptor.full_name)
    if special is not None:
        special(value, message, path)
        return
    if not isinstance(value, dict):
        raise invalid_value(path, f"message {descriptor.full_name}", f"expected an object, got {describe(value)}")
    message.SetInParent()
    fields = _fields(descriptor)
    set_so_far: dict[str, str] = {}  # field or oneof name -> the key that set it
    for key, item in value.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            raise unknown_field_error(join(path, str(key)), descriptor.full_name, str(key))
        child = join(path, field.name)
        oneof = field.containing_oneof
        slot = oneof.name if oneof is not None and not is_synthetic_oneof(oneof) else field.name
        if slot in set_so_far:
            raise invalid_value(child, _type_label(field),
                                f"'{field.name}' has already been set (either directly or as part of a oneof)")
        if item is None and not _accepts_null(field):
            continue  # proto3 JSON: null means "unset"
        set_so_far[slot] = key
        _parse_field(item, message, field, child)


def is_synthetic_oneof(oneof: Any) -> bool:
    """proto3 ``optional`` fields live in a synthetic one-field oneof; it is not a user oneof."""
    return bool(len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}")


def _accepts_null(field: FieldDescriptor) -> bool:
    return (field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and not is_map(field)
            and not field.is_repeated
            and field.message_type.full_name == "google.protobuf.Value")


def is_map(field: FieldDescriptor) -> bool:
    """A ``map<K, V>`` field (a repeated field of a synthetic map-entry message)."""
    return bool(field.is_repeated and field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
                and field.message_type.GetOptions().map_entry)


def _type_label(field: FieldDescriptor) -> str:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return f"message {field.message_type.full_name}"
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return f"enum {field.enum_type.full_name}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "bytes"
    return {
        FieldDescriptor.CPPTYPE_STRING: "string", FieldDescriptor.CPPTYPE_BOOL: "bool",
        FieldDescriptor.CPPTYPE_DOUBLE: "double", FieldDescriptor.CPPTYPE_FLOAT: "float",
    }.get(field.cpp_type) or _INT_RANGES[field.cpp_type][0]


def _parse_field(value: Any, message: Message, field: FieldDescriptor, path: str) -> None:
    if is_map(field):
        _parse_map(value, getattr(message, field.name), field, path)
    elif field.is_repeated:
        if not isinstance(value, list):
            raise invalid_value(path, f"repeated {_type_label(field)}", f"expected an array, got {describe(value)}")
        target = getattr(message, field.name)
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                if item is None and field.message_type.full_name != "google.protobuf.Value":
                    raise invalid_value(item_path, _type_label(field), "null is not allowed in a repeated field")
                _parse_message(item, target.add(), item_path)
            else:
                target.append(_scalar(item, field, item_path))
    elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        _parse_message(value, getattr(message, field.name), path)
    else:
        setattr(message, field.name, _scalar(value, field, path))


def _parse_map(value: Any, target: Any, field: FieldDescriptor, path: str) -> None:
    if not isinstance(value, dict):
        raise invalid_value(path, f"map {field.message_type.full_name}", f"expected an object, got {describe(value)}")
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    for raw_key, item in value.items():
        item_path = f"{path}[{raw_key}]"
        text_key = ("true" if raw_key else "false") if isinstance(raw_key, bool) else str(raw_key)
        key = _scalar(text_key, key_field, item_path) if key_field.cpp_type != FieldDescriptor.CPPTYPE_STRING \
            else text_key
        if value_field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            _parse_message(item, target[key], item_path)
        else:
            target[key] = _scalar(item, value_field, item_path)


def _scalar(value: Any, field: FieldDescriptor, path: str) -> Any:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return _bytes(value, path)
        if not isinstance(value, str):
            raise invalid_value(path, "string", f"expected a string, got {describe(value)}")
        return value
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        # Envoy's JSON parser (legacy syntax) reads a quoted bool with absl::SimpleAtob.
        if isinstance(value, str) and value.lower() in _ATOB:
            return _ATOB[value.lower()]
        raise invalid_value(path, "bool", f"expected true or false, got {describe(value)}")
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(value, field, path)
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return _float(value, cpp == FieldDescriptor.CPPTYPE_FLOAT, path)
    return _int(value, cpp, path)


def _int(value: Any, cpp: int, path: str) -> int:
    kind, low, high = _INT_RANGES[cpp]
    number: int
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid_value(path, kind, f"expected a number, got {describe(value)}")
    if isinstance(value, int):
        number = value
    else:
        parsed: float | int
        try:
            parsed = int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise invalid_value(path, kind, f"invalid number: {value!r}") from None
        if isinstance(parsed, float):
            if not math.isfinite(parsed) or not parsed.is_integer():
                raise invalid_value(path, kind, "expected integer, but JSON number had fractional part")
            parsed = int(parsed)
        number = parsed
    if not low <= number <= high:
        raise invalid_value(path, kind, f"number {number} out of range [{low}, {high}]")
    return number


def _float(value: Any, is_float32: bool, path: str) -> float:
    kind = "float" if is_float32 else "double"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid_value(path, kind, f"expected a number, got {describe(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise invalid_value(path, kind, f"invalid number: {value!r}") from None
    if isinstance(value, str) and math.isinf(number) and value not in ("Infinity", "-Infinity"):
        raise invalid_value(path, kind, f"invalid number: {value!r}")
    if is_float32 and math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise invalid_value(path, kind, f"number {number} out of range")
    return number


def _bytes(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise invalid_value(path, "bytes", f"expected a base64 string, got {describe(value)}")
    padded = value + "=" * (-len(value) % 4)
    try:
        altchars = b"-_" if ("-" in value or "_" in value) else None
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_value(path, "bytes", f"invalid base64: {value!r}") from None


def _enum(value: Any, field: FieldDescriptor, path: str) -> int:
    enum = field.enum_type
    if isinstance(value, str):
        # Envoy parses with case_insensitive_enum_parsing: `type: strict_dns` is STRICT_DNS.
        found = enum.values_by_name.get(value) or enum.values_by_name.get(value.upper())
        if found is None:
            names = ", ".join(v.name for v in enum.values)
            raise ConfigError(f"Protobuf message (type {field.containing_type.full_name} reason INVALID_ARGUMENT: "
                              f"unknown enum value: '{value}') has unknown fields; {enum.full_name} is one of: "
                              f"{names}", path)
        return int(found.number)
    if isinstance(value, int) and not isinstance(value, bool):
        # Open enums take any int32; an undefined one is caught by PGV `defined_only`, as in Envoy.
        return _int(value, FieldDescriptor.CPPTYPE_INT32, path)
    raise invalid_value(path, f"enum {enum.full_name}", f"expected an enum name, got {describe(value)}")


# -- well-known types with their own JSON form -------------------------------------------------

def _parse_any(value: Any, message: Message, path: str) -> None:
    if not isinstance(value, dict):
        raise invalid_value(path, "message google.protobuf.Any", f"expected an object, got {describe(value)}")
    message.SetInParent()
    if not value:
        return  # an empty Any: Envoy reports the missing type where the extension is looked up
    type_url = value.get("@type")
    if not isinstance(type_url, str):
        raise invalid_value(path, "message google.protobuf.Any",
                            "missing '@type'" if type_url is None else f"'@type' must be a string, got "
                                                                        f"{describe(type_url)}")
    inner_class = type_index.message_class(type_url.rsplit("/", 1)[-1])
    if inner_class is None:
        raise ConfigError(f"Unable to parse JSON as proto (INVALID_ARGUMENT: could not find @type '{type_url}')",
                          join(path, "@type"))
    inner = inner_class()
    rest = {k: v for k, v in value.items() if k != "@type"}
    if inner.DESCRIPTOR.full_name in _WELL_KNOWN:
        # A well-known type with a non-object JSON form sits under "value" in an Any.
        unknown = [k for k in rest if k != "value"]
        if unknown:
            raise unknown_field_error(join(path, str(unknown[0])), inner.DESCRIPTOR.full_name, str(unknown[0]))
        if "value" in rest:
            _parse_message(rest["value"], inner, join(path, "value"))
    else:
        _parse_message(rest, inner, path)
    message.type_url = type_url
    message.value = inner.SerializeToString(deterministic=True)


def _parse_duration(value: Any, message: Message, path: str) -> None:
    if not isinstance(value, str):
        raise invalid_value(path, "message google.protobuf.Duration",
                            f"expected a string like \"5s\" or \"0.25s\", got {describe(value)}")
    match = _DURATION.match(value)
    if match is None:
        raise invalid_value(path, "message google.protobuf.Duration",
                            f"invalid duration {value!r}: expected seconds with an \"s\" suffix, like \"5s\" "
                            f"or \"0.25s\"")
    sign = -1 if match.group(1) else 1
    seconds = int(match.group(2))
    nanos = int((match.group(3) or "").ljust(9, "0"))
    if seconds > _MAX_DURATION_SECONDS:
        raise invalid_value(path, "message google.protobuf.Duration", f"duration {value!r} out of range")
    message.seconds = sign * seconds
    message.nanos = sign * nanos
    message.SetInParent()


def _parse_wrapper(value: Any, message: Message, path: str) -> None:
    message.SetInParent()
    message.value = _scalar(value, message.DESCRIPTOR.fields_by_name["value"], path)


def _parse_empty(value: Any, message: Message, path: str) -> None:
    if not isinstance(value, dict) or value:
        raise invalid_value(path, "message google.protobuf.Empty", f"expected {{}}, got {describe(value)}")
    message.SetInParent()


def _parse_json_passthrough(value: Any, message: Message, path: str) -> None:
    try:
        json_format.ParseDict(_jsonable(value), message)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise invalid_value(path, f"message {message.DESCRIPTOR.full_name}", str(e).splitlines()[0]) from None
    message.SetInParent()


def _jsonable(value: Any) -> Any:
    # YAML keys may be ints or bools; a Struct's keys are strings.
    if isinstance(value, dict):
        return {(("true" if k else "false") if isinstance(k, bool) else str(k)): _jsonable(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


_WELL_KNOWN = {
    "google.protobuf.Any": _parse_any,
    "google.protobuf.Duration": _parse_duration,
    "google.protobuf.Empty": _parse_empty,
    **{name: _parse_wrapper for name in _WRAPPERS},
    **{name: _parse_json_passthrough for name in _JSON_PASSTHROUGH},
}
