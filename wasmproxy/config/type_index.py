"""Lazy index from protobuf type name to the xds-protos module that defines it.

xds-protos ships about 800 ``*_pb2`` modules; importing them all costs seconds.
A config names only a handful of types (through ``typed_config`` ``@type``), so we
import just those. The index (full type name -> module name) is built once by
reading each module's serialized ``FileDescriptorProto`` *without importing it*,
and cached on disk keyed by the xds-protos and protobuf versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import re
import threading
from pathlib import Path

from google.protobuf import __version__ as _protobuf_version
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

# The roots xds-protos installs (plus protobuf's own well-known types).
_ROOTS = ("envoy", "xds", "udpa", "validate", "google", "cel", "opencensus", "opentelemetry")
_SERIALIZED = re.compile(rb"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)")
_INDEX_FORMAT = 1

_lock = threading.Lock()
_index: dict[str, str] | None = None


def message_class(full_name: str) -> type[Message] | None:
    """The generated class for ``full_name`` (e.g. ``envoy.config.cluster.v3.Cluster``), importing
    only the module that defines it; None when no installed module defines it."""
    descriptor = find_message_descriptor(full_name)
    if descriptor is None:
        return None
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def find_message_descriptor(full_name: str) -> Descriptor | None:
    """The descriptor of ``full_name`` from the default pool, importing its module on a miss."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindMessageTypeByName(full_name)
    except KeyError:
        pass
    module = type_index().get(full_name)
    if module is None:
        return None
    importlib.import_module(module)
    try:
        return pool.FindMessageTypeByName(full_name)
    except KeyError:  # the index names an enum, not a message
        return None


def type_index() -> dict[str, str]:
    """Full name of every message and enum -> defining module; loaded from the disk cache, else built."""
    global _index
    with _lock:
        if _index is None:
            _index = _load_or_build()
        return _index


def _site_dir() -> Path:
    # The directory holding the xds-protos roots; found without importing any of them.
    spec = importlib.util.find_spec("validate")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - xds-protos missing
        raise RuntimeError("xds-protos is not installed (no 'validate' package)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def _cache_key(site: Path) -> str:
    dists = sorted(p.name for p in site.glob("xds_protos-*.dist-info"))
    return f"{_INDEX_FORMAT}|{'|'.join(dists)}|protobuf-{_protobuf_version}|{site}"


def _cache_path(key: str) -> Path:
    base = os.environ.get("WASMPROXY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wasmproxy")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(base) / f"xds-type-index-{digest}.json"


def _load_or_build() -> dict[str, str]:
    site = _site_dir()
    key = _cache_key(site)
    path = _cache_path(key)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return dict(cached["types"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index = build_index(site)
    try:  # best effort: a read-only home only costs the rebuild next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "types": index}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return index


def build_index(site: Path) -> dict[str, str]:
    """Scan every ``*_pb2.py`` under the known roots of ``site`` and map the names it defines."""
    index: dict[str, str] = {}
    for root in _ROOTS:
        top = site / root
        if not top.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if not name.endswith("_pb2.py"):
                    continue
                file = Path(dirpath) / name
                module = ".".join(file.relative_to(site).with_suffix("").parts)
                for type_name in _names_defined(file.read_bytes()):
                    index.setdefault(type_name, module)
    return index


def _names_defined(source: bytes) -> list[str]:
    match = _SERIALIZED.search(source)
    if match is None:
        return []
    proto = descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(match.group(1).decode("latin-1")))
    prefix = f"{proto.package}." if proto.package else ""
    names: list[str] = []

    def walk(messages: list[descriptor_pb2.DescriptorProto], scope: str) -> None:
        for msg in messages:
            full = scope + msg.name
            names.append(full)
            names.extend(f"{full}.{e.name}" for e in msg.enum_type)
            walk(list(msg.nested_type), full + ".")

    walk(list(proto.message_type), prefix)
    names.extend(prefix + e.name for e in proto.enum_type)
    return names
