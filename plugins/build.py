"""Build the Proxy-Wasm test plugins into plugins/out/, reproducibly and incrementally.

    python -m plugins.build [NAME ...] [--force] [--list]

Toolchains (Debian): clang-19 + wasi-libc for C, wat2wasm (wabt) for WAT, node/npm for the
AssemblyScript SDK (pinned in plugins/as/package-lock.json, installed with `npm ci`).
A target is rebuilt only when its inputs (sources, flags, toolchain versions) changed; the
output bytes carry no timestamps or paths, so two builds give identical files.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

PLUGINS_DIR = Path(__file__).resolve().parent
ROOT = PLUGINS_DIR.parent
OUT_DIR = PLUGINS_DIR / "out"
C_DIR = PLUGINS_DIR / "c"
WAT_DIR = PLUGINS_DIR / "wat"
AS_DIR = PLUGINS_DIR / "as"
DEMO_SOURCE = ROOT / "wasmproxy" / "demo" / "example_plugin.c"
DEMO_WASM = ROOT / "wasmproxy" / "demo" / "example.wasm"

CLANG = "clang-19"
C_FLAGS = ("-O2", "-Wall", "-Wno-unused-parameter", "-Werror", "-ffile-prefix-map=/=")
# --strip-debug drops wasi-libc's DWARF (it names build paths); the name section stays for traps.
WASI_FLAGS = ("--target=wasm32-wasi", "-mexec-model=reactor", "-Wl,--strip-debug", "-Wl,--export=malloc")
NOWASI_FLAGS = ("--target=wasm32", "-nostdlib", "-Wl,--no-entry", "-Wl,--strip-debug")

TOOL_PACKAGES = {
    CLANG: "clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32",
    "wat2wasm": "wabt",
    "node": "nodejs",
    "npm": "npm",
}


class BuildError(RuntimeError):
    """A plugin could not be built; the message says which and why (or which package is missing)."""


@dataclass(frozen=True)
class Target:
    """One output file, out/<name>.wasm, and how to make it."""

    name: str
    kind: str  # "c" (WASI reactor), "c-nowasi", "wat", "as", "truncate", "bytes"
    sources: tuple[Path, ...] = ()
    defines: tuple[str, ...] = ()
    data: bytes = b""  # "bytes": the file content
    truncate_of: str = ""  # "truncate": the target whose first `truncate_at` bytes we keep
    truncate_at: int = 0
    tools: tuple[str, ...] = ()  # executables needed (their versions are part of the stamp)

    @property
    def output(self) -> Path:
        return OUT_DIR / f"{self.name}.wasm"


def _c(name: str, source: str, *defines: str) -> Target:
    return Target(name, "c", (C_DIR / source, C_DIR / "proxy_wasm.h"), defines, tools=(CLANG,))


def _wat(name: str) -> Target:
    return Target(name, "wat", (WAT_DIR / f"{name}.wat",), tools=("wat2wasm",))


TARGETS: tuple[Target, ...] = (
    _c("headers", "headers.c"),
    _c("headers_abi020", "headers.c", "PROXY_WASM_ABI=20"),
    _c("headers_abi010", "headers.c", "PROXY_WASM_ABI=10"),
    _c("body", "body.c"),
    _c("local_reply", "local_reply.c"),
    _c("pause", "pause.c"),
    _c("shared", "shared.c"),
    _c("metrics", "metrics.c"),
    _c("props", "props.c"),
    _c("logging", "logging.c"),
    _c("abi_all", "abi_all.c"),
    _c("trap", "trap.c"),
    _c("tcp_filter", "tcp_filter.c"),
    _c("tcp_service", "tcp_service.c"),
    _c("grpc_callout", "grpc_callout.c"),
    _c("envoy_extras", "envoy_extras.c"),
    Target("example", "c", (DEMO_SOURCE,), tools=(CLANG,)),
    Target("nowasi", "c-nowasi", (C_DIR / "nowasi.c",), tools=(CLANG,)),
    Target(
        "as_header",
        "as",
        (AS_DIR / "assembly" / "index.ts", AS_DIR / "package.json", AS_DIR / "package-lock.json"),
        tools=("node", "npm"),
    ),
    _wat("wat_no_abi"),
    _wat("wat_unknown_import"),
    _wat("wat_bad_pointers"),
    _wat("wat_infinite_loop"),
    _wat("wat_memory_grow"),
    _wat("wat_proc_exit"),
    _wat("wat_minimal"),
    Target("corrupt_truncated", "truncate", truncate_of="headers", truncate_at=100),
    Target("corrupt_garbage", "bytes", data=b"\x00asm\x01\x00\x00\x00\x01\xff\xff\xff\xff garbage"),
)
TARGETS_BY_NAME = {t.name: t for t in TARGETS}

_tool_versions: dict[str, str] = {}
_tool_lock = threading.Lock()
_npm_lock = threading.Lock()


def _require_tool(tool: str) -> str:
    """The tool's version line (part of every stamp); BuildError naming the Debian package if absent."""
    with _tool_lock:
        if tool in _tool_versions:
            return _tool_versions[tool]
        if shutil.which(tool) is None:
            raise BuildError(
                f"{tool} not found: install the Debian package(s) {TOOL_PACKAGES[tool]} "
                f"(`apt-get install {TOOL_PACKAGES[tool]}` or `./dev toolchain`)"
            )
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        version = (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"
        _tool_versions[tool] = version
        return version


def _stamp(target: Target) -> str:
    """A digest of everything the output depends on."""
    h = hashlib.sha256()
    h.update(repr((target.kind, target.defines, target.data, target.truncate_of, target.truncate_at)).encode())
    flags = {"c": C_FLAGS + WASI_FLAGS, "c-nowasi": C_FLAGS + NOWASI_FLAGS}.get(target.kind, ())
    h.update(repr(flags).encode())
    for tool in target.tools:
        h.update(_require_tool(tool).encode())
    for src in target.sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    if target.kind == "truncate":
        h.update(TARGETS_BY_NAME[target.truncate_of].output.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"building {what} failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")


def _npm_ci() -> None:
    """Install the pinned AssemblyScript toolchain into plugins/as/node_modules once per lockfile."""
    with _npm_lock, open(AS_DIR / "package-lock.json", "rb") as lockfile:
        # Other processes (parallel test runs) may build too: one npm ci at a time.
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        marker = AS_DIR / "node_modules" / ".wasmproxy-lock-sha256"
        digest = hashlib.sha256(lockfile.read()).hexdigest()
        if marker.exists() and marker.read_text() == digest:
            return
        _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], AS_DIR, "AssemblyScript deps (npm ci)")
        marker.write_text(digest)


def _produce(target: Target, tmp: Path) -> None:
    """Write target's bytes to tmp."""
    if target.kind in ("c", "c-nowasi"):
        src = target.sources[0]
        flags = WASI_FLAGS if target.kind == "c" else NOWASI_FLAGS
        cmd = [CLANG, *flags, *C_FLAGS, *(f"-D{d}" for d in target.defines), "-I", str(C_DIR)]
        # Relative paths, run from the source directory: nothing machine-specific reaches the output.
        cmd += ["-o", str(tmp), src.name]
        _run(cmd, src.parent, target.name)
    elif target.kind == "wat":
        _run(["wat2wasm", target.sources[0].name, "-o", str(tmp)], target.sources[0].parent, target.name)
    elif target.kind == "as":
        _npm_ci()
        asc = AS_DIR / "node_modules" / "assemblyscript" / "bin" / "asc"
        cmd = ["node", str(asc), "assembly/index.ts", "-b", str(tmp), "--use", "abort=abort_proc_exit", "-O3"]
        _run(cmd, AS_DIR, target.name)
    elif target.kind == "truncate":
        tmp.write_bytes(TARGETS_BY_NAME[target.truncate_of].output.read_bytes()[: target.truncate_at])
    elif target.kind == "bytes":
        tmp.write_bytes(target.data)
    else:  # pragma: no cover - the table above is the only source of kinds
        raise BuildError(f"unknown target kind {target.kind!r}")


def build_target(target: Target, force: bool = False) -> bool:
    """Build one target unless its stamp is unchanged; returns True when it was (re)built."""
    stamp_file = OUT_DIR / f".{target.name}.stamp"
    stamp = _stamp(target)
    if not force and target.output.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return False
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # Build under the final file name (lld records it as the module name) in a private directory,
    # then rename: concurrent builders never see half a file.
    with tempfile.TemporaryDirectory(dir=OUT_DIR, prefix=f".{target.name}.") as tmpdir:
        tmp = Path(tmpdir) / target.output.name
        _produce(target, tmp)
        os.replace(tmp, target.output)
    stamp_file.write_text(stamp)
    return True


def build(names: list[str] | None = None, force: bool = False, jobs: int = 2) -> dict[str, Path]:
    """Build the named targets (all by default); returns name -> output path. Raises BuildError."""
    return {name: path for name, (path, _) in _build(names, force, jobs).items()}


def _build(names: list[str] | None, force: bool, jobs: int) -> dict[str, tuple[Path, bool]]:
    wanted = list(TARGETS) if not names else [_target(n) for n in names]
    # Derived targets come last, after the targets they are cut from.
    derived = [t for t in wanted if t.kind == "truncate"]
    sources = dict.fromkeys([t for t in wanted if t.kind != "truncate"]
                            + [TARGETS_BY_NAME[t.truncate_of] for t in derived])
    built: dict[str, bool] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for phase in (list(sources), derived):
            futures = {t.name: pool.submit(build_target, t, force) for t in phase}
            for name, fut in futures.items():
                built[name] = fut.result()
    return {t.name: (t.output, built[t.name]) for t in wanted}


def _target(name: str) -> Target:
    try:
        return TARGETS_BY_NAME[name]
    except KeyError:
        raise BuildError(f"unknown plugin {name!r}; known: {', '.join(TARGETS_BY_NAME)}") from None


def plugin_path(name: str) -> str:
    """Path of out/<name>.wasm, building it first if it is missing or stale (cheap when up to date)."""
    return str(build([name])[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="targets to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for t in TARGETS:
            print(f"{t.name:24} {t.kind}")
        return 0
    try:
        outputs = _build(args.names, args.force, jobs=2)
    except BuildError as exc:
        print(f"plugins.build: {exc}", file=sys.stderr)
        return 1
    rebuilt = sorted(name for name, (_, was_built) in outputs.items() if was_built)
    print(
        f"plugins.build: {len(outputs)} plugin(s) in {OUT_DIR.relative_to(ROOT)}/, "
        f"rebuilt {len(rebuilt)}{': ' + ' '.join(rebuilt) if rebuilt else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
