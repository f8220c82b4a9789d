"""Bootstrap loading into Envoy's own protos (xds-protos), field-path errors, validation, extensions.

Public API::

    load_bootstrap(path) -> Bootstrap           # raises ConfigError("<field path>: <message>")
    load_bootstrap_text(text, fmt="yaml") -> Bootstrap
    validate_config(path) -> list[str]          # [] when valid; for `--mode validate`
    validate_ok_message(path) -> str           # "configuration '<path>' OK"
    registry.resolve(Category.HTTP_FILTERS, typed_config) -> factory callable
    util.duration_ms(message, "field", default)
"""

from __future__ import annotations

from wasmproxy.config.bootstrap import (
    VALIDATE_EXIT_INVALID,
    VALIDATE_EXIT_OK,
    load_bootstrap,
    load_bootstrap_text,
    validate_config,
    validate_ok_message,
)
from wasmproxy.config.errors import ConfigError

__all__ = [
    "VALIDATE_EXIT_INVALID",
    "VALIDATE_EXIT_OK",
    "ConfigError",
    "load_bootstrap",
    "load_bootstrap_text",
    "validate_config",
    "validate_ok_message",
]
