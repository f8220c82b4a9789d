"""The test-plugin build: reproducible bytes, incremental, clear toolchain errors, the demo plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import wasmtime

from plugins import build as plugin_build


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    return plugin_build.build()


def test_demo_plugin_is_its_source_built(built: dict[str, Path]) -> None:
    committed = plugin_build.DEMO_WASM.read_bytes()
    assert built["example"].read_bytes() == committed, "rebuild: python -m plugins.build example && cp"


def test_every_plugin_but_the_corrupt_ones_is_valid_wasm(built: dict[str, Path]) -> None:
    engine = wasmtime.Engine()
    for name, path in built.items():
        data = path.read_bytes()
        if name.startswith("corrupt_"):
            with pytest.raises(wasmtime.WasmtimeError):
                wasmtime.Module(engine, data)
        else:
            wasmtime.Module(engine, data)


@pytest.mark.parametrize(
    ("name", "marker"),
    [("headers", "proxy_abi_version_0_2_1"), ("headers_abi020", "proxy_abi_version_0_2_0"),
     ("headers_abi010", "proxy_abi_version_0_1_0"), ("as_header", "proxy_abi_version_0_2_0"),
     ("example", "proxy_abi_version_0_2_1"), ("nowasi", "proxy_abi_version_0_2_1")],
)
def test_abi_marker_exported(built: dict[str, Path], name: str, marker: str) -> None:
    module = wasmtime.Module(wasmtime.Engine(), built[name].read_bytes())
    exports = {e.name for e in module.exports}
    assert marker in exports
    assert not {e for e in exports if e.startswith("proxy_abi_version_")} - {marker}


def test_no_abi_plugin_has_no_marker_and_nowasi_imports_only_env(built: dict[str, Path]) -> None:
    engine = wasmtime.Engine()
    no_abi = wasmtime.Module(engine, built["wat_no_abi"].read_bytes())
    assert not [e for e in no_abi.exports if e.name.startswith("proxy_abi_version")]
    nowasi = wasmtime.Module(engine, built["nowasi"].read_bytes())
    assert {i.module for i in nowasi.imports} == {"env"}


def test_rebuild_gives_identical_bytes(built: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["headers", "example", "wat_bad_pointers", "as_header", "nowasi", "corrupt_truncated"]
    monkeypatch.setattr(plugin_build, "OUT_DIR", tmp_path)
    again = plugin_build.build(names, force=True)
    for name in names:
        assert again[name].read_bytes() == built[name].read_bytes(), name
        assert b"/work/" not in again[name].read_bytes() and str(tmp_path).encode() not in again[name].read_bytes()


def test_unchanged_sources_are_not_rebuilt(built: dict[str, Path]) -> None:
    assert plugin_build.build_target(plugin_build.TARGETS_BY_NAME["headers"]) is False


def test_changed_source_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wat = tmp_path / "w.wat"
    wat.write_text('(module (func (export "a")))')
    target = plugin_build.Target("w", "wat", (wat,), tools=("wat2wasm",))
    monkeypatch.setattr(plugin_build, "OUT_DIR", tmp_path / "out")
    assert plugin_build.build_target(target) is True
    assert plugin_build.build_target(target) is False
    wat.write_text('(module (func (export "b")))')
    assert plugin_build.build_target(target) is True
    assert b"b" in target.output.read_bytes()


def test_missing_toolchain_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(plugin_build.shutil, "which", lambda tool: None if tool == "clang-19" else real_which(tool))
    monkeypatch.setattr(plugin_build, "_tool_versions", {})
    with pytest.raises(plugin_build.BuildError, match="clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32"):
        plugin_build.build(["headers"], force=True)


def test_unknown_plugin_is_a_clear_error() -> None:
    with pytest.raises(plugin_build.BuildError, match="unknown plugin 'nope'"):
        plugin_build.build(["nope"])


def test_compile_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bad.c"
    src.write_text("int f(void) { return }\n")
    monkeypatch.setattr(plugin_build, "OUT_DIR", tmp_path / "out")
    with pytest.raises(plugin_build.BuildError, match="building bad failed"):
        plugin_build.build_target(plugin_build.Target("bad", "c", (src,), tools=("clang-19",)))
