"""Envoy's ``MessageUtil::validate`` over any message: the duration sanity check, then the
protoc-gen-validate (PGV) rules that the xds protos carry as ``(validate.rules)`` field options.

The rules are read from the descriptors (xds-protos' ``validate_pb2`` extensions), so one generic
validator covers every message. Messages are worded as PGV's C++ validators (what Envoy prints):

    Proto constraint validation failed (ClusterValidationError.Name: value length must be at
    least 1 characters)

with the chain of ``embedded message failed validation | caused by`` from the validated root.
As in Envoy, the first violation wins; non-oneof fields are checked in declaration order, then
oneofs. Envoy validates each ``typed_config`` when its factory unpacks it, so an ``Any`` starts a
new chain rooted at the packed type.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message
from validate import validate_pb2

from wasmproxy.config import type_index
from wasmproxy.config.errors import ConfigError
from wasmproxy.config.proto_json import is_map, is_synthetic_oneof

_HEADER_RE_NON_STRICT = "^[^\x00\n\r]*$"
_WELL_KNOWN_REGEX = {
    (validate_pb2.HTTP_HEADER_NAME, True): "^:?[0-9a-zA-Z!#$%&'*+-.^_|~\x60]+$",
    (validate_pb2.HTTP_HEADER_VALUE, True): "^[^\x00-\x08\x0a-\x1f\x7f]*$",
    (validate_pb2.HTTP_HEADER_NAME, False): _HEADER_RE_NON_STRICT,
    (validate_pb2.HTTP_HEADER_VALUE, False): _HEADER_RE_NON_STRICT,
}
_NUMERIC_KINDS = ("float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64",
                  "fixed32", "fixed64", "sfixed32", "sfixed64")
_WRAPPERS = frozenset(f"google.protobuf.{n}Value" for n in
                      ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes"))


def validate(message: Message, path: str = "") -> None:
    """Raise ConfigError for the first duration or PGV violation in ``message`` (and in every
    ``Any`` inside it whose type is installed)."""
    check_durations(message, path)
    violation = _validate_message(message, path)
    if violation is not None:
        raise ConfigError(f"Proto constraint validation failed ({violation.text})", violation.path)


def check_durations(message: Message, path: str = "") -> None:
    """Envoy's ``validateDurationFields``: a negative Duration anywhere is an error."""
    for item, item_path in iter_messages(message, path):
        if item.DESCRIPTOR.full_name == "google.protobuf.Duration" and (item.seconds < 0 or item.nanos < 0):
            raise ConfigError(f"Invalid duration: Expected positive duration: {_debug_duration(item)}", item_path)


def iter_messages(message: Message, path: str = "") -> Iterator[tuple[Message, str]]:
    """Every message set inside ``message`` (depth first, with its field path), looking into each
    ``Any`` whose type is installed: the packed message takes the Any's place and path."""
    for field, value, field_path in _set_fields(message, path):
        if _element_type(field).cpp_type != FieldDescriptor.CPPTYPE_MESSAGE:
            continue
        for item, item_path in _items(field, value, field_path):
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                item = unpack_any(item)
                if item is None:
                    continue
            yield item, item_path
            yield from iter_messages(item, item_path)


def unpack_any(any_message: Message) -> Message | None:
    """The message packed in ``any_message``, or None when its type is not installed."""
    type_url: str = any_message.type_url
    if not type_url:
        return None
    cls = type_index.message_class(type_url.rsplit("/", 1)[-1])
    if cls is None:
        return None
    inner = cls()
    inner.ParseFromString(any_message.value)
    return inner


# -- traversal -----------------------------------------------------------------------------------

@dataclass
class _Violation:
    path: str
    text: str
    final: bool = False  # from inside an Any: already a full chain, do not wrap


def _set_fields(message: Message, path: str) -> Iterable[tuple[FieldDescriptor, Any, str]]:
    for field, value in message.ListFields():
        yield field, value, f"{path}.{field.name}" if path else field.name


def _element_type(field: FieldDescriptor) -> FieldDescriptor:
    """The field whose type a repeated/singular field's elements have: a map's value field, else itself."""
    return field.message_type.fields_by_name["value"] if is_map(field) else field


def _items(field: FieldDescriptor, value: Any, path: str) -> Iterable[tuple[Any, str]]:
    if is_map(field):
        for key in sorted(value):
            yield value[key], f"{path}[{key}]"
    elif field.is_repeated:
        for i, item in enumerate(value):
            yield item, f"{path}[{i}]"
    else:
        yield value, path


def _debug_duration(d: Any) -> str:
    # The TextFormat debug string Envoy prints: zero fields omitted.
    parts = [f"seconds: {d.seconds}"] if d.seconds else []
    if d.nanos:
        parts.append(f"nanos: {d.nanos}")
    return " ".join(parts)


# -- rules ---------------------------------------------------------------------------------------

_rules_cache: dict[str, tuple[list[tuple[FieldDescriptor, Any]], list[tuple[OneofDescriptor, bool]], bool]] = {}


def _plan(descriptor: Descriptor) -> tuple[list[tuple[FieldDescriptor, Any]], list[tuple[OneofDescriptor, bool]], bool]:
    """(every field with its rules or None, the real oneofs with their `required`, disabled) for a type."""
    plan = _rules_cache.get(descriptor.full_name)
    if plan is None:
        options = descriptor.GetOptions()
        disabled = bool(options.Extensions[validate_pb2.disabled] or options.Extensions[validate_pb2.ignored])
        fields = []
        for field in descriptor.fields:
            field_options = field.GetOptions()
            rules = field_options.Extensions[validate_pb2.rules] if field_options.HasExtension(
                validate_pb2.rules) else None
            fields.append((field, rules))
        oneofs = [(o, bool(o.GetOptions().Extensions[validate_pb2.required])) for o in descriptor.oneofs
                  if not is_synthetic_oneof(o)]
        plan = (fields, oneofs, disabled)
        _rules_cache[descriptor.full_name] = plan
    return plan


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _validate_message(message: Message, path: str) -> _Violation | None:
    descriptor = message.DESCRIPTOR
    fields, oneofs, disabled = _plan(descriptor)
    if disabled:
        return None
    in_oneof = {f.name for o, _ in oneofs for f in o.fields}
    ordered = [(f, r) for f, r in fields if f.name not in in_oneof]
    for oneof, required in oneofs:
        chosen = message.WhichOneof(oneof.name)
        if chosen is None:
            if required:
                return _Violation(path, f'field: "{oneof.name}", reason: is required')
            continue
        ordered.extend((f, r) for f, r in fields if f.name == chosen)
    for field, rules in ordered:
        violation = _validate_field(message, field, rules, path)
        if violation is not None:
            return violation
    return None


def _validate_field(message: Message, field: FieldDescriptor, rules: Any, path: str) -> _Violation | None:
    field_path = f"{path}.{field.name}" if path else field.name
    prefix = f"{field.containing_type.name}ValidationError.{_camel(field.name)}"
    value = getattr(message, field.name)
    if is_map(field):
        return _validate_map(field, value, rules, field_path, prefix)
    if field.is_repeated:
        return _validate_repeated(field, value, rules, field_path, prefix)
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        present = message.HasField(field.name)
        return _validate_embedded(field, value if present else None, rules, field_path, prefix)
    if rules is None:
        return None
    reason = scalar_violation(field, value, rules)
    return _Violation(field_path, f"{prefix}: {reason}") if reason else None


def _validate_embedded(field: FieldDescriptor, value: Message | None, rules: Any, path: str,
                       prefix: str) -> _Violation | None:
    """A singular message field (or one repeated/map item, with ``prefix`` carrying the index)."""
    type_name = field.message_type.full_name
    kind = rules.WhichOneof("type") if rules is not None else None
    if value is None:
        required = rules is not None and (rules.message.required or (kind == "duration" and rules.duration.required)
                                          or (kind == "any" and rules.any.required)
                                          or (kind == "timestamp" and rules.timestamp.required))
        return _Violation(path, f"{prefix}: value is required") if required else None
    if kind is not None:
        if type_name in _WRAPPERS:
            reason = scalar_violation(field.message_type.fields_by_name["value"], value.value, rules)
        elif kind == "duration":
            reason = _duration_reason(value, rules.duration)
        elif kind == "any":
            reason = _any_reason(value, rules.any)
        else:
            reason = None
        if reason:
            return _Violation(path, f"{prefix}: {reason}")
    if type_name == "google.protobuf.Any":
        inner = unpack_any(value)
        if inner is None:
            return None
        violation = _validate_message(inner, path)
        if violation is not None:
            violation.final = True
        return violation
    if rules is not None and rules.message.skip:
        return None
    violation = _validate_message(value, path)
    if violation is None or violation.final:
        return violation
    return _Violation(violation.path, f"{prefix}: embedded message failed validation | caused by {violation.text}")


def _validate_repeated(field: FieldDescriptor, value: Any, rules: Any, path: str, prefix: str) -> _Violation | None:
    repeated = rules.repeated if rules is not None and rules.WhichOneof("type") == "repeated" else None
    if repeated is not None and not (repeated.ignore_empty and len(value) == 0):
        if repeated.HasField("min_items") and len(value) < repeated.min_items:
            return _Violation(path, f"{prefix}: value must contain at least {repeated.min_items} item(s)")
        if repeated.HasField("max_items") and len(value) > repeated.max_items:
            return _Violation(path, f"{prefix}: value must contain no more than {repeated.max_items} item(s)")
        if repeated.unique and field.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE and len(set(value)) != len(value):
            return _Violation(path, f"{prefix}: repeated value must contain unique items")
    items = repeated.items if repeated is not None and repeated.HasField("items") else None
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        item_prefix = f"{prefix}[{i}]"
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            violation = _validate_embedded(field, item, items, item_path, item_prefix)
            if violation is not None:
                return violation
        elif items is not None:
            reason = scalar_violation(field, item, items)
            if reason:
                return _Violation(item_path, f"{item_prefix}: {reason}")
    return None


def _validate_map(field: FieldDescriptor, value: Any, rules: Any, path: str, prefix: str) -> _Violation | None:
    map_rules = rules.map if rules is not None and rules.WhichOneof("type") == "map" else None
    if map_rules is not None and not (map_rules.ignore_empty and len(value) == 0):
        if map_rules.HasField("min_pairs") and len(value) < map_rules.min_pairs:
            return _Violation(path, f"{prefix}: value must contain at least {map_rules.min_pairs} pair(s)")
        if map_rules.HasField("max_pairs") and len(value) > map_rules.max_pairs:
            return _Violation(path, f"{prefix}: value must contain no more than {map_rules.max_pairs} pair(s)")
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    key_rules = map_rules.keys if map_rules is not None and map_rules.HasField("keys") else None
    value_rules = map_rules.values if map_rules is not None and map_rules.HasField("values") else None
    for key in sorted(value):
        item_path = f"{path}[{key}]"
        item_prefix = f"{prefix}[{key}]"
        if key_rules is not None:
            reason = scalar_violation(key_field, key, key_rules)
            if reason:
                return _Violation(item_path, f"key for {item_prefix}: {reason}")
        if value_field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            violation = _validate_embedded(value_field, value[key], value_rules, item_path, item_prefix)
            if violation is not None:
                return violation
        elif value_rules is not None:
            reason = scalar_violation(value_field, value[key], value_rules)
            if reason:
                return _Violation(item_path, f"{item_prefix}: {reason}")
    return None


# -- scalar rules ----------------------------------------------------------------------------------

def scalar_violation(field: FieldDescriptor, value: Any, rules: Any) -> str | None:
    """Why a scalar ``value`` of ``field`` breaks the ``validate.FieldRules`` ``rules`` (PGV's
    wording), or None. ``field`` matters only for enums (their defined values)."""
    kind = rules.WhichOneof("type")
    if kind is None:
        return None
    typed = getattr(rules, kind)
    if kind in _NUMERIC_KINDS:
        return _numeric_reason(value, typed)
    if kind == "string":
        return _string_reason(value, typed)
    if kind == "bytes":
        return _bytes_reason(value, typed)
    if kind == "bool":
        return f"value must equal {_lit(typed.const)}" if typed.HasField("const") and value != typed.const else None
    if kind == "enum":
        return _enum_reason(field, value, typed)
    return None


def _lit(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return _go_quote(value)
    return str(value)


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
               "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str) -> str:
    """Go's %q, which PGV uses for literals in messages."""
    return '"' + "".join(_GO_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in text) + '"'


def _list(values: Iterable[Any]) -> str:
    return "[" + " ".join(str(v) for v in values) + "]"


def _range_reason(value: Any, rules: Any, fmt: Callable[[Any], str]) -> str | None:
    """PGV's lt/lte/gt/gte template (templates/goshared/ltgt.go), shared by numbers and durations."""
    has = rules.HasField
    lt, lte, gt, gte = (getattr(rules, n) if has(n) else None for n in ("lt", "lte", "gt", "gte"))
    upper, upper_incl = (lt, False) if lt is not None else (lte, True)
    lower, lower_incl = (gt, False) if gt is not None else (gte, True)
    if upper is not None and lower is not None:
        lo_b = "[" if lower_incl else "("
        hi_b = "]" if upper_incl else ")"
        below = value < lower if lower_incl else value <= lower
        above = value > upper if upper_incl else value >= upper
        if upper > lower:
            if below or above:
                return f"value must be inside range {lo_b}{fmt(lower)}, {fmt(upper)}{hi_b}"
        elif below and above:
            # Exclusive range: PGV words it with the bounds swapped.
            lo_o = "(" if upper_incl else "["
            hi_o = ")" if lower_incl else "]"
            return f"value must be outside range {lo_o}{fmt(upper)}, {fmt(lower)}{hi_o}"
        return None
    if upper is not None:
        if (value > upper) if upper_incl else (value >= upper):
            return f"value must be less than {'or equal to ' if upper_incl else ''}{fmt(upper)}"
    elif lower is not None:
        if (value < lower) if lower_incl else (value <= lower):
            return f"value must be greater than {'or equal to ' if lower_incl else ''}{fmt(lower)}"
    return None


def _numeric_reason(value: Any, rules: Any) -> str | None:
    if rules.ignore_empty and value == 0:
        return None
    if rules.HasField("const") and value != rules.const:
        return f"value must equal {_lit(rules.const)}"
    reason = _range_reason(value, rules, _lit)
    if reason:
        return reason
    values_in = getattr(rules, "in")
    if values_in and value not in values_in:
        return f"value must be in list {_list(_lit(v) for v in values_in)}"
    if rules.not_in and value in rules.not_in:
        return f"value must not be in list {_list(_lit(v) for v in rules.not_in)}"
    return None


def _string_reason(value: str, rules: Any) -> str | None:
    if rules.ignore_empty and value == "":
        return None
    if rules.HasField("const") and value != rules.const:
        return f"value must equal {_go_quote(rules.const)}"
    values_in = getattr(rules, "in")
    if values_in and value not in values_in:
        return f"value must be in list {_list(values_in)}"
    if rules.not_in and value in rules.not_in:
        return f"value must not be in list {_list(rules.not_in)}"
    length = len(value)  # code points, as PGV's Utf8Len
    if rules.HasField("len") and length != rules.len:
        return f"value length must be {rules.len} characters"
    if rules.HasField("min_len") and rules.HasField("max_len") and rules.min_len != rules.max_len:
        if not rules.min_len <= length <= rules.max_len:
            return f"value length must be between {rules.min_len} and {rules.max_len} characters, inclusive"
    elif rules.HasField("min_len") and rules.HasField("max_len"):
        if length != rules.min_len:
            return f"value length must be {rules.min_len} characters"
    elif rules.HasField("min_len") and length < rules.min_len:
        return f"value length must be at least {rules.min_len} characters"
    elif rules.HasField("max_len") and length > rules.max_len:
        return f"value length must be at most {rules.max_len} characters"
    size = len(value.encode())
    if rules.HasField("len_bytes") and size != rules.len_bytes:
        return f"value length must be {rules.len_bytes} bytes"
    if rules.HasField("min_bytes") and size < rules.min_bytes:
        return f"value length must be at least {rules.min_bytes} bytes"
    if rules.HasField("max_bytes") and size > rules.max_bytes:
        return f"value length must be at most {rules.max_bytes} bytes"
    if rules.HasField("prefix") and not value.startswith(rules.prefix):
        return f"value does not have prefix {_go_quote(rules.prefix)}"
    if rules.HasField("suffix") and not value.endswith(rules.suffix):
        return f"value does not have suffix {_go_quote(rules.suffix)}"
    if rules.HasField("contains") and rules.contains not in value:
        return f"value does not contain substring {_go_quote(rules.contains)}"
    if rules.HasField("not_contains") and rules.not_contains in value:
        return f"value contains substring {_go_quote(rules.not_contains)}"
    pattern = rules.pattern if rules.HasField("pattern") else None
    if rules.WhichOneof("well_known") == "well_known_regex":
        pattern = _WELL_KNOWN_REGEX.get((rules.well_known_regex, rules.strict))
    if pattern is not None and not _full_match(pattern, value):
        return f"value does not match regex pattern {_go_quote(pattern)}"
    return _well_known_string_reason(value, rules.WhichOneof("well_known"))


def _full_match(pattern: str, value: str) -> bool:
    try:
        return re.fullmatch(pattern, value, re.DOTALL) is not None
    except re.error:  # an RE2-only construct: do not reject what we cannot check
        return True


def _well_known_string_reason(value: str, well_known: str | None) -> str | None:
    if well_known in (None, "well_known_regex", "email", "uri", "uri_ref"):
        return None  # PGV's C++ validators (Envoy's) leave email/uri unimplemented
    if well_known == "hostname" and not _is_hostname(value):
        return "value must be a valid hostname"
    if well_known == "ip" and not _is_ip(value, None):
        return "value must be a valid IP Address"
    if well_known == "ipv4" and not _is_ip(value, 4):
        return "value must be a valid IPv4 Address"
    if well_known == "ipv6" and not _is_ip(value, 6):
        return "value must be a valid IPv6 Address"
    if well_known == "address" and not (_is_hostname(value) or _is_ip(value, None)):
        return "value must be an ip address, or a hostname."
    if well_known == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            return "value must be a valid UUID"
    return None


def _is_ip(value: str, version: int | None) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return version is None or address.version == version


def _is_hostname(value: str) -> bool:
    host = value[:-1] if value.endswith(".") else value
    if not host or len(host) > 253:
        return False
    return all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
               and all(c.isascii() and (c.isalnum() or c == "-") for c in label) for label in host.split("."))


def _bytes_reason(value: bytes, rules: Any) -> str | None:
    if rules.ignore_empty and value == b"":
        return None
    if rules.HasField("const") and value != rules.const:
        return "value must equal " + _go_quote(rules.const.decode("latin-1"))
    if rules.HasField("len") and len(value) != rules.len:
        return f"value length must be {rules.len} bytes"
    if rules.HasField("min_len") and len(value) < rules.min_len:
        return f"value length must be at least {rules.min_len} bytes"
    if rules.HasField("max_len") and len(value) > rules.max_len:
        return f"value length must be at most {rules.max_len} bytes"
    if rules.HasField("prefix") and not value.startswith(rules.prefix):
        return "value does not have prefix " + _go_quote(rules.prefix.decode("latin-1"))
    if rules.HasField("suffix") and not value.endswith(rules.suffix):
        return "value does not have suffix " + _go_quote(rules.suffix.decode("latin-1"))
    if rules.HasField("contains") and rules.contains not in value:
        return "value does not contain " + _go_quote(rules.contains.decode("latin-1"))
    return None


def _enum_reason(field: FieldDescriptor, value: int, rules: Any) -> str | None:
    if rules.HasField("const") and value != rules.const:
        return f"value must equal {rules.const}"
    if rules.defined_only and value not in field.enum_type.values_by_number:
        return "value must be one of the defined enum values"
    values_in = getattr(rules, "in")
    if values_in and value not in values_in:
        return f"value must be in list {_list(values_in)}"
    if rules.not_in and value in rules.not_in:
        return f"value must not be in list {_list(rules.not_in)}"
    return None


def _duration_nanos(d: Any) -> int:
    return int(d.seconds) * 1_000_000_000 + int(d.nanos)


def go_duration(nanos: int) -> str:
    """Go's ``time.Duration.String()``, which PGV uses for duration bounds ("0s", "1ms", "1m30s")."""
    if nanos == 0:
        return "0s"
    sign, n = ("-", -nanos) if nanos < 0 else ("", nanos)

    def frac(v: int, unit: int) -> str:
        whole, rest = divmod(v, unit)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)

    if n < 1_000:
        text = f"{n}ns"
    elif n < 1_000_000:
        text = frac(n, 1_000) + "µs"
    elif n < 1_000_000_000:
        text = frac(n, 1_000_000) + "ms"
    else:
        hours, rest = divmod(n, 3_600_000_000_000)
        minutes, rest = divmod(rest, 60_000_000_000)
        text = frac(rest, 1_000_000_000) + "s"
        if hours:
            text = f"{hours}h{minutes}m{text}"
        elif minutes:
            text = f"{minutes}m{text}"
    return sign + text


def _duration_reason(value: Any, rules: Any) -> str | None:
    nanos = _duration_nanos(value)
    if rules.HasField("const") and nanos != _duration_nanos(rules.const):
        return f"value must equal {go_duration(_duration_nanos(rules.const))}"

    class _Bounds:  # the ltgt template over nanoseconds
        def __init__(self) -> None:
            self._set = {n: _duration_nanos(getattr(rules, n)) for n in ("lt", "lte", "gt", "gte")
                         if rules.HasField(n)}

        def HasField(self, name: str) -> bool:  # noqa: N802 - mirrors the protobuf API
            return name in self._set

        def __getattr__(self, name: str) -> int:
            return self._set[name]

    reason = _range_reason(nanos, _Bounds(), go_duration)
    if reason:
        return reason
    values_in = [_duration_nanos(d) for d in getattr(rules, "in")]
    if values_in and nanos not in values_in:
        return f"value must be in list {_list(go_duration(v) for v in values_in)}"
    values_out = [_duration_nanos(d) for d in rules.not_in]
    if values_out and nanos in values_out:
        return f"value must not be in list {_list(go_duration(v) for v in values_out)}"
    return None


def _any_reason(value: Any, rules: Any) -> str | None:
    values_in = getattr(rules, "in")
    if values_in and value.type_url not in values_in:
        return f"type URL must be in list {_list(values_in)}"
    if rules.not_in and value.type_url in rules.not_in:
        return f"type URL must not be in list {_list(rules.not_in)}"
    return None
