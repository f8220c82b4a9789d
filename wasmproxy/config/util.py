"""Small readers for proto fields, after Envoy's PROTOBUF_GET_* macros (source/common/protobuf/utility.h).

Durations and wrappers stay protobuf messages in the Bootstrap; these turn them into numbers
with Envoy's defaulting (an unset field gives the default, a set zero stays zero)."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message

T = TypeVar("T")


def to_ms(duration: Any) -> int:
    """A google.protobuf.Duration in whole milliseconds (Envoy's DurationUtil::durationToMilliseconds)."""
    return int(duration.seconds) * 1000 + int(duration.nanos) // 1_000_000


def to_seconds(duration: Any) -> float:
    """A google.protobuf.Duration in (fractional) seconds, for timers."""
    return int(duration.seconds) + int(duration.nanos) / 1e9


def duration_ms(message: Message, field: str, default: T) -> int | T:
    """PROTOBUF_GET_MS_OR_DEFAULT: ``message.<field>`` in ms, or ``default`` when unset."""
    return to_ms(getattr(message, field)) if message.HasField(field) else default


def duration_ms_required(message: Message, field: str) -> int:
    """PROTOBUF_GET_MS_REQUIRED: for fields PGV already made mandatory."""
    return to_ms(getattr(message, field))


def wrapped(message: Message, field: str, default: T) -> Any:
    """PROTOBUF_GET_WRAPPED_OR_DEFAULT: the ``.value`` of a wrapper field (UInt32Value, BoolValue...)."""
    return getattr(message, field).value if message.HasField(field) else default


def percent(message: Message, field: str, max_value: float, default: float) -> float:
    """PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT's input: a ``type.v3.Percent`` field scaled to
    ``max_value`` (Percent.value is 0-100)."""
    return getattr(message, field).value * max_value / 100.0 if message.HasField(field) else default
