"""Load a user's envoy.yaml / envoy.json into ``envoy.config.bootstrap.v3.Bootstrap`` and validate it
the way ``envoy --mode validate`` does: parse (proto3 JSON), PGV rules, then load-time semantics."""

from __future__ import annotations

import os

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

from wasmproxy.config import pgv, proto_json, semantic, source
from wasmproxy.config.errors import ConfigError
from wasmproxy.config.source import Format

# `wasmproxy --mode validate` mirrors `envoy --mode validate`: validate_ok_message() on stdout and
# exit 0 when valid; otherwise each message from validate_config() logged at critical level
# (stderr) and exit 1.
VALIDATE_EXIT_OK = 0
VALIDATE_EXIT_INVALID = 1

ConfigPath = str | os.PathLike[str]


def load_bootstrap(path: ConfigPath | None, *, config_yaml: str | None = None) -> Bootstrap:
    """Read, parse and validate a config file (.yaml/.yml as YAML, .json or anything else as JSON,
    as Envoy decides). ``config_yaml`` is Envoy's ``--config-yaml``: parsed on its own and merged
    over the file (repeated fields append, as protobuf MergeFrom). Raises ConfigError whose message
    names the field path."""
    if path is None and config_yaml is None:
        raise ConfigError("At least one of --config-path or --config-yaml should be non-empty")
    bootstrap = Bootstrap()
    if path is not None:
        document, _fmt = source.read_config_file(path)
        proto_json.parse_into(document, bootstrap)
    if config_yaml is not None:
        overlay = Bootstrap()
        proto_json.parse_into(source.parse_text(config_yaml, "yaml"), overlay)
        bootstrap.MergeFrom(overlay)
    return _validated(bootstrap)


def load_bootstrap_text(text: str, fmt: Format = "yaml") -> Bootstrap:
    """Parse and validate config text in ``fmt`` ("yaml" or "json")."""
    bootstrap = Bootstrap()
    proto_json.parse_into(source.parse_text(text, fmt), bootstrap)
    return _validated(bootstrap)


def _validated(bootstrap: Bootstrap) -> Bootstrap:
    pgv.validate(bootstrap)
    semantic.check_bootstrap(bootstrap)
    return bootstrap


def validate_config(path: ConfigPath | None, *, config_yaml: str | None = None) -> list[str]:
    """The messages ``--mode validate`` prints: empty when the config is valid (then print
    :func:`validate_ok_message`), else Envoy's ``error initializing configuration '<path>': ...``."""
    try:
        load_bootstrap(path, config_yaml=config_yaml)
    except ConfigError as e:
        return [f"error initializing configuration '{os.fspath(path) if path is not None else ''}': {e}"]
    return []


def validate_ok_message(path: ConfigPath | None) -> str:
    """What Envoy prints on stdout for a valid config in validate mode."""
    return f"configuration '{os.fspath(path) if path is not None else ''}' OK"
