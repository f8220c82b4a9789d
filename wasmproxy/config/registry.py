"""The extension registry: which Envoy extensions wasmproxy supports, and where their factories live.

Envoy finds a factory by the ``@type`` of an extension's ``typed_config`` (unwrapping
``TypedStruct``), not by its ``name``. Here each supported extension maps that type (and Envoy's
canonical extension name) to a factory *path* ``"module:function"`` that is imported only by
:func:`resolve`, so config validation never imports the data path.

Factory signatures are the business of each category's consumer (e.g. the HCM calls an HTTP
filter factory with the unpacked typed config and its factory context).
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf.message import Message

from wasmproxy.config.errors import ConfigError

_TYPE_URL_PREFIX = "type.googleapis.com/"
_TYPED_STRUCTS = frozenset(("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"))


class Category(enum.Enum):
    """Envoy's extension categories that a bootstrap can name."""

    NETWORK_FILTERS = "network filters"
    HTTP_FILTERS = "http filters"
    ACCESS_LOGGERS = "access loggers"
    BOOTSTRAP_EXTENSIONS = "bootstrap extensions"
    CLUSTERS = "clusters"


@dataclass(frozen=True)
class Extension:
    """One supported extension. ``terminal`` is Envoy's ``isTerminalFilterByProto`` for filters."""

    category: Category
    name: str  # Envoy's canonical name, e.g. "envoy.filters.http.router"
    type_name: str  # full proto name of its typed_config
    factory_path: str  # "module:function", imported on demand
    terminal: bool = False


_by_type: dict[Category, dict[str, Extension]] = {c: {} for c in Category}
_by_name: dict[Category, dict[str, Extension]] = {c: {} for c in Category}


def register(category: Category, name: str, type_name: str, factory_path: str, *, terminal: bool = False) -> None:
    """Declare a supported extension (replacing any earlier one of the same type)."""
    if ":" not in factory_path:
        raise ValueError(f"factory path must be 'module:function', got {factory_path!r}")
    ext = Extension(category, name, type_name, factory_path, terminal)
    _by_type[category][type_name] = ext
    _by_name[category][name] = ext


def supported(category: Category) -> list[Extension]:
    """The registered extensions of a category, by name."""
    return sorted(_by_type[category].values(), key=lambda e: e.name)


def type_name_of(typed_config: Message) -> str:
    """Full proto name an Any carries, looking through ``TypedStruct`` as Envoy does ("" if unset)."""
    name = _strip(typed_config.type_url)
    if name in _TYPED_STRUCTS:
        from wasmproxy.config.type_index import message_class

        cls = message_class(name)
        assert cls is not None  # both TypedStructs ship with xds-protos
        inner = cls()
        inner.ParseFromString(typed_config.value)
        return _strip(inner.type_url)
    return name


def _strip(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def lookup(category: Category, any_or_name: Message | str) -> Extension | None:
    """The extension for an Any (by its type), a type URL / full type name, or an extension name."""
    if isinstance(any_or_name, str):
        key = any_or_name.removeprefix(_TYPE_URL_PREFIX)
        return _by_type[category].get(key) or _by_name[category].get(key)
    return _by_type[category].get(type_name_of(any_or_name))


def find(category: Category, name: str, typed_config: Message | None, path: str) -> Extension:
    """The extension a config entry (``name`` + ``typed_config``) selects, or ConfigError naming
    ``path`` when it has no type (Envoy's wording) or names one wasmproxy does not support."""
    type_name = type_name_of(typed_config) if typed_config is not None else ""
    if not type_name:
        raise ConfigError(f"Didn't find a registered implementation for '{name}' with type URL: ''", path)
    ext = _by_type[category].get(type_name)
    if ext is None:
        choices = ", ".join(e.name for e in supported(category)) or "none"
        raise ConfigError(f"extension not supported: '{name}' with type URL '{_TYPE_URL_PREFIX}{type_name}' "
                          f"(wasmproxy supports these {category.value}: {choices})", path)
    return ext


def resolve(category: Category, any_or_name: Message | str) -> Callable[..., Any]:
    """Import and return the factory callable of a supported extension (ConfigError otherwise)."""
    ext = lookup(category, any_or_name)
    if ext is None:
        shown = any_or_name if isinstance(any_or_name, str) else any_or_name.type_url
        raise ConfigError(f"extension not supported: {shown} (not one of wasmproxy's {category.value})")
    module_name, _, function = ext.factory_path.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module_name), function)
    return factory


def unpack(typed_config: Message, path: str = "") -> Message:
    """The typed config message inside an Any, for factories. A ``TypedStruct`` is converted to the
    type it names and validated (Envoy does both when the factory runs); errors name ``path``."""
    from wasmproxy.config import pgv, proto_json, type_index

    name = _strip(typed_config.type_url)
    if name not in _TYPED_STRUCTS:
        message = pgv.unpack_any(typed_config)
        if message is None:
            raise ConfigError(f"could not find @type '{typed_config.type_url}'", path)
        return message
    from google.protobuf import json_format

    cls = type_index.message_class(name)
    assert cls is not None  # both TypedStructs ship with xds-protos
    typed_struct = cls()
    typed_struct.ParseFromString(typed_config.value)
    inner_cls = type_index.message_class(_strip(typed_struct.type_url))
    if inner_cls is None:
        raise ConfigError(f"Unable to parse JSON as proto (INVALID_ARGUMENT: could not find @type "
                          f"'{typed_struct.type_url}')", f"{path}.type_url" if path else "type_url")
    message = inner_cls()
    value_path = f"{path}.value" if path else "value"
    proto_json.parse_into(json_format.MessageToDict(typed_struct.value), message, value_path)
    pgv.validate(message, value_path)
    return message


_ACCESS_LOG_FACTORY = "wasmproxy.http.access_log:create_access_logger"

register(Category.HTTP_FILTERS, "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router",
         "wasmproxy.router.router_filter:create_router_filter_factory", terminal=True)
register(Category.HTTP_FILTERS, "envoy.filters.http.wasm", "envoy.extensions.filters.http.wasm.v3.Wasm",
         "wasmproxy.wasm.http_filter:create_wasm_filter_factory")
register(Category.NETWORK_FILTERS, "envoy.filters.network.http_connection_manager",
         "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
         "wasmproxy.http.conn_manager:create_hcm_factory", terminal=True)
register(Category.NETWORK_FILTERS, "envoy.filters.network.tcp_proxy",
         "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
         "wasmproxy.tcp.tcp_proxy:create_tcp_proxy_factory", terminal=True)
register(Category.NETWORK_FILTERS, "envoy.filters.network.wasm", "envoy.extensions.filters.network.wasm.v3.Wasm",
         "wasmproxy.wasm.network_filter:create_wasm_network_filter_factory")
register(Category.ACCESS_LOGGERS, "envoy.access_loggers.stdout",
         "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", _ACCESS_LOG_FACTORY)
register(Category.ACCESS_LOGGERS, "envoy.access_loggers.stderr",
         "envoy.extensions.access_loggers.stream.v3.StderrAccessLog", _ACCESS_LOG_FACTORY)
register(Category.ACCESS_LOGGERS, "envoy.access_loggers.file",
         "envoy.extensions.access_loggers.file.v3.FileAccessLog", _ACCESS_LOG_FACTORY)
register(Category.BOOTSTRAP_EXTENSIONS, "envoy.bootstrap.wasm", "envoy.extensions.wasm.v3.WasmService",
         "wasmproxy.wasm.service:create_wasm_service")
