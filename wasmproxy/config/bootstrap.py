"""Load a user's envoy.yaml / envoy.json into ``envoy.config.bootstrap.v3.Bootstrap`` and validate it
the way ``envoy --mode validate`` does: parse (proto3 JSON), PGV rules, then load-time semantics."""

from __future__ import annotations

import os

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

from wasmproxy.config import pgv, proto_json, semantic, source
from wasmproxy.config.errors import ConfigError
from wasmproxy.config.source import Format

# `wasmproxy --mode validate` mirrors `envoy --mode validate`: this line on stdout and exit 0 when
# valid; otherwise each message from validate_config() on stderr and exit 1.
VALIDATE_EXIT_OK = 0
VALIDATE_EXIT_INVALID = 1


def load_bootstrap(path: str | os.PathLike[str]) -> Bootstrap:
    """Read, parse and validate a config file (.yaml/.yml as YAML, .json or anything else as JSON,
    as Envoy decides). Raises ConfigError whose message names the field path."""
    document, _fmt = source.read_config_file(path)
    return _build(document)


def load_bootstrap_text(text: str, fmt: Format = "yaml") -> Bootstrap:
    """Parse and validate config text in ``fmt`` ("yaml" or "json")."""
    return _build(source.parse_text(text, fmt))


def _build(document: object) -> Bootstrap:
    bootstrap = Bootstrap()
    proto_json.parse_into(document, bootstrap)
    pgv.validate(bootstrap)
    semantic.check_bootstrap(bootstrap)
    return bootstrap


def validate_config(path: str | os.PathLike[str]) -> list[str]:
    """The messages ``--mode validate`` prints: empty when the config is valid (then print
    :func:`validate_ok_message`), else Envoy's ``error initializing configuration '<path>': ...``."""
    try:
        load_bootstrap(path)
    except ConfigError as e:
        return [f"error initializing configuration '{os.fspath(path)}': {e}"]
    return []


def validate_ok_message(path: str | os.PathLike[str]) -> str:
    """What Envoy prints on stdout for a valid config in validate mode."""
    return f"configuration '{os.fspath(path)}' OK"
