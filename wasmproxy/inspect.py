"""`wasmproxy inspect plugin.wasm`: what a Proxy-Wasm module declares and needs, and whether
this build provides it — without running any of its code.

Reports the ABI version (the ``proxy_abi_version_*`` marker export), the exported callbacks
(``proxy_on_*``) and allocator, every import with whether we link it (a missing function or a
signature that differs makes cpp-host refuse the module: "missing import" / "import type
mismatch"), the WASI functions it needs, its memory limits against the 1 GiB cap, its size
and compile time. `inspect_bytes` is the library form; `check_config_plugins` inspects every
plugin a bootstrap references (for ``--mode validate``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .wasm import hostcalls
from .wasm.abi import AbiVersionError, detect_abi_version
from .wasm.runtime import MAX_WASM_MEMORY_SIZE_BYTES, FuncSig, WasmLoadError, compile_module
from .wasm.wasi import WASI_MODULES, env_runtime_host_functions, wasi_host_functions
from .wasm.wasm import Wasm

__all__ = ["ImportInfo", "Inspection", "check_config_plugins", "inspect_bytes", "inspect_file", "main"]

_PAGE = 64 * 1024
_ALLOCATORS = ("proxy_on_memory_allocate", "malloc")
_START_FUNCTIONS = ("_initialize", "_start")


@dataclass
class ImportInfo:
    module: str
    name: str
    kind: str  # func, memory, table, global, ...
    signature: str = ""  # "i32 i32 -> i32" for functions
    supported: bool = False
    problem: str = ""  # why we cannot link it


@dataclass
class Inspection:
    """What `inspect_bytes` found. ``problems`` empty: this build can load the module."""

    name: str
    size_bytes: int
    sha256: str = ""
    compile_ms: float = 0.0
    abi_version: str | None = None
    callbacks: list[str] = field(default_factory=list)
    allocator: str | None = None
    start_function: str | None = None
    other_exports: list[str] = field(default_factory=list)
    imports: list[ImportInfo] = field(default_factory=list)
    wasi: list[str] = field(default_factory=list)
    memory_min_pages: int | None = None
    memory_max_pages: int | None = None
    memory_cap_bytes: int = MAX_WASM_MEMORY_SIZE_BYTES
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _sig_text(sig: FuncSig | None) -> str:
    if sig is None:
        return ""
    return f"{' '.join(sig.params) or 'void'} -> {' '.join(sig.results) or 'void'}"


class _Reader:
    """Just enough of the binary format for the memory limits (section 2 imports, 5 memories)."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self) -> int:
        result = shift = 0
        for _ in range(10):
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result
        raise ValueError("LEB128 too long")

    def skip_name(self) -> None:
        self.pos += self.uleb()

    def limits(self) -> tuple[int, int | None]:
        flags = self.byte()
        minimum = self.uleb()
        maximum = self.uleb() if flags & 1 else None
        return minimum, maximum


def _memory_limits(code: bytes) -> tuple[int, int | None] | None:
    """(min, max) pages of the first memory, imported or defined; None if there is none."""
    r = _Reader(code, 8)
    while r.pos < len(code):
        section, size = r.byte(), r.uleb()
        end = r.pos + size
        if section == 2:
            for _ in range(r.uleb()):
                r.skip_name()
                r.skip_name()
                kind = r.byte()
                if kind == 0x00:
                    r.uleb()
                elif kind == 0x01:
                    r.byte()
                    r.limits()
                elif kind == 0x02:
                    return r.limits()
                elif kind == 0x03:
                    r.byte()
                    r.byte()
                else:  # only plain imports are expected here; stop rather than misread
                    break
        elif section == 5 and r.uleb() > 0:
            return r.limits()
        r.pos = end
    return None


def _host_table(module: Any, abi: Any) -> dict[tuple[str, str], Any]:
    """Every import this build links for a module of ABI `abi` (as Wasm.initialize builds it)."""
    probe = Wasm(module, post=lambda cb: None)
    probe.abi_version = abi
    table = wasi_host_functions(lambda: None, [], lambda level, text: None)  # type: ignore[arg-type, return-value]
    table.update(env_runtime_host_functions())
    table.update(hostcalls.host_functions(probe))
    return table


def _signature_problem(host: Any, name: str, sig: FuncSig | None) -> str:
    """"" when `host` can serve an import of type `sig`. WASI functions declare their wasm type;
    the Proxy-Wasm ones are Python methods taking i32/i64 arguments and returning one i32, so
    their arity is what must match."""
    expected = getattr(host, "wasm_signature", None)
    if expected is not None:
        return "" if expected == sig else f"import type mismatch: we provide {_sig_text(expected)}"
    method = getattr(hostcalls._Exports, name, None)  # the unwrapped implementation
    if method is None or sig is None:
        return ""
    arity = len(inspect.signature(method).parameters) - 1  # self
    if len(sig.params) != arity or sig.results != ("i32",):
        return f"import type mismatch: we provide {' '.join(['i32'] * arity) or 'void'} -> i32"
    return ""


def inspect_bytes(code: bytes, name: str = "plugin") -> Inspection:
    """Inspect a module's bytes. Raises WasmLoadError when they are no valid Wasm module."""
    report = Inspection(name=name, size_bytes=len(code))
    started = time.perf_counter()
    module = compile_module(code, name=name)
    report.compile_ms = round((time.perf_counter() - started) * 1000, 2)
    report.sha256 = module.sha256
    exports = module.exports
    try:
        abi = detect_abi_version(exports)
        report.abi_version = abi.value
    except AbiVersionError as e:
        abi = None
        report.problems.append(str(e))
    report.callbacks = sorted(n for n in exports if n.startswith("proxy_on_") and n != "proxy_on_memory_allocate")
    report.allocator = next((n for n in _ALLOCATORS if n in exports), None)
    if report.allocator is None:
        report.problems.append("Wasm module is missing malloc function.")
    report.start_function = next((n for n in _START_FUNCTIONS if n in exports), None)
    report.other_exports = sorted(n for n in exports if not n.startswith(("proxy_on_", "proxy_abi_version_"))
                                  and n not in _ALLOCATORS and n not in _START_FUNCTIONS)
    table = _host_table(module, abi) if abi is not None else {}
    for mod, field_name, sig in module.imports:
        info = ImportInfo(mod, field_name, "func", _sig_text(sig))
        host = table.get((mod, field_name))
        if host is None:
            info.problem = "missing import" if abi is not None else "not checked (no ABI version)"
        else:
            info.problem = _signature_problem(host, field_name, sig)
            info.supported = not info.problem
        if mod in WASI_MODULES:
            report.wasi.append(field_name)
        report.imports.append(info)
        if info.problem and abi is not None:
            report.problems.append(f"import {mod}.{field_name} ({info.signature}): {info.problem}")
    limits = _memory_limits(code)
    if limits is None:
        report.problems.append("Wasm module has no memory")
    else:
        report.memory_min_pages, report.memory_max_pages = limits
        if limits[0] * _PAGE > MAX_WASM_MEMORY_SIZE_BYTES:
            report.problems.append(f"initial memory {limits[0]} pages exceeds the "
                                   f"{MAX_WASM_MEMORY_SIZE_BYTES // _PAGE}-page cap")
    return report


def inspect_file(path: str | Path) -> Inspection:
    """Inspect a .wasm file. Raises OSError (unreadable) or WasmLoadError (not a valid module)."""
    path = Path(path)
    return inspect_bytes(path.read_bytes(), path.name)


# -- configs (for --mode validate) --------------------------------------------------------------

_TYPE_MODULES = ("envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
                 "envoy.extensions.filters.http.wasm.v3.wasm_pb2", "envoy.extensions.filters.network.wasm.v3.wasm_pb2",
                 "envoy.extensions.wasm.v3.wasm_pb2")
_PLUGIN_TYPES = ("envoy.extensions.filters.http.wasm.v3.Wasm", "envoy.extensions.filters.network.wasm.v3.Wasm",
                 "envoy.extensions.wasm.v3.WasmService")


def _plugin_configs(message: Any) -> Iterator[Any]:
    """Every envoy.extensions.wasm.v3.PluginConfig inside `message`, through typed Anys."""
    for module in _TYPE_MODULES:  # GetSymbol finds only the message types that were imported
        importlib.import_module(module)
    from google.protobuf import any_pb2, symbol_database

    if isinstance(message, any_pb2.Any):
        type_name = message.type_url.rpartition("/")[2]
        try:
            cls = symbol_database.Default().GetSymbol(type_name)
        except KeyError:
            return
        inner = cls()
        if not message.Unpack(inner):
            return
        if type_name in _PLUGIN_TYPES:
            yield inner.config
            return
        yield from _plugin_configs(inner)
        return
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated and fd.message_type.GetOptions().map_entry:
            values = [v for v in value.values() if hasattr(v, "ListFields")]
        elif fd.is_repeated:
            values = list(value)
        else:
            values = [value]
        for v in values:
            yield from _plugin_configs(v)


def check_config_plugins(bootstrap: Any) -> list[str]:
    """``--mode validate``: inspect the local code of every Wasm plugin in a Bootstrap proto;
    one message per plugin this build cannot load (empty: all fine)."""
    messages = []
    for config in _plugin_configs(bootstrap):
        local = config.vm_config.code.local
        which = local.WhichOneof("specifier")
        if which == "filename":
            label = local.filename
            try:
                code = Path(local.filename).read_bytes()
            except OSError as e:
                messages.append(f"Wasm plugin {config.name}: cannot read {label}: {e.strerror}")
                continue
        elif which in ("inline_bytes", "inline_string"):
            label = "<inline>"
            code = local.inline_bytes if which == "inline_bytes" else local.inline_string.encode()
        else:
            continue  # remote code is fetched at startup
        try:
            report = inspect_bytes(code, config.name)
        except WasmLoadError as e:
            messages.append(f"Wasm plugin {config.name} ({label}): {e}")
            continue
        messages.extend(f"Wasm plugin {config.name} ({label}): {p}" for p in report.problems)
    return messages


# -- the command --------------------------------------------------------------------------------


def _text(report: Inspection) -> str:
    lines = [f"{report.name}: {report.size_bytes} bytes, sha256 {report.sha256[:16]}…, "
             f"compiled in {report.compile_ms} ms",
             f"ABI version: {report.abi_version or 'none'}",
             f"callbacks ({len(report.callbacks)}): {', '.join(report.callbacks) or '-'}",
             f"allocator: {report.allocator or 'MISSING'}; start: {report.start_function or '-'}"]
    max_pages = "none" if report.memory_max_pages is None else str(report.memory_max_pages)
    if report.memory_min_pages is not None:
        lines.append(f"memory: {report.memory_min_pages} pages initial, max {max_pages} "
                     f"(cap {report.memory_cap_bytes // _PAGE} pages = {report.memory_cap_bytes >> 20} MiB)")
    lines.append(f"WASI: {', '.join(report.wasi) or 'none'}")
    lines.append(f"imports ({len(report.imports)}):")
    for i in report.imports:
        mark = "ok " if i.supported else "NO "
        lines.append(f"  {mark} {i.module}.{i.name} ({i.signature})" + (f" — {i.problem}" if i.problem else ""))
    if report.problems:
        lines.append("PROBLEMS:")
        lines.extend(f"  {p}" for p in report.problems)
    else:
        lines.append("OK: this build can load the plugin")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0: loadable; 1: needs something we do not provide; 2: not a readable Wasm module."""
    parser = argparse.ArgumentParser(prog="wasmproxy inspect",
                                     description="Show what a Proxy-Wasm plugin exports and needs.")
    parser.add_argument("plugin", nargs="+", help=".wasm file(s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    code = 0
    reports: list[dict[str, Any]] = []
    for path in args.plugin:
        try:
            report = inspect_file(path)
        except OSError as e:
            error = f"{path}: cannot read: {e.strerror}"
        except WasmLoadError as e:
            error = f"{path}: not a valid Wasm module: {e}"
        else:
            code = max(code, 0 if report.ok else 1)
            reports.append(report.to_json()) if args.json else print(_text(report))
            continue
        code = 2
        if args.json:
            reports.append({"name": path, "ok": False, "error": error})
        else:
            print(error, file=sys.stderr)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return code
