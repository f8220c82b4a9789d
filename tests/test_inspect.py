"""`wasmproxy inspect`: what a plugin exports and needs, checked on the project's plugins
(the ones real Envoy 1.40 refuses to start with are the ones inspect flags)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import wasmtime
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from tests.wasm_filter_support import plugin_path
from wasmproxy.cli import main as cli_main
from wasmproxy.inspect import check_config_plugins, inspect_bytes, inspect_file

_WRONG_SIGNATURE = """
(module
  (import "env" "proxy_log" (func (param i32 i32) (result i32)))
  (memory (export "memory") 1 4)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param i32 i32)))
"""


def test_a_c_plugin_is_fully_supported() -> None:
    report = inspect_file(plugin_path("headers"))
    assert report.ok and report.abi_version == "0.2.1"
    assert "proxy_on_request_headers" in report.callbacks and report.allocator == "proxy_on_memory_allocate"
    assert report.start_function == "_initialize"
    assert {"fd_write"} <= set(report.wasi)
    assert all(i.supported for i in report.imports)
    assert report.memory_min_pages is not None and report.size_bytes == Path(plugin_path("headers")).stat().st_size


def test_abi_0_1_0_and_assemblyscript() -> None:
    old = inspect_file(plugin_path("headers_abi010"))
    assert old.ok and old.abi_version == "0.1.0"
    assert any(i.name == "proxy_get_configuration" and i.supported for i in old.imports)
    script = inspect_file(plugin_path("as_header"))
    assert script.ok and script.abi_version == "0.2.0" and script.allocator == "malloc"
    assert "proc_exit" in script.wasi


def test_what_envoy_refuses_is_a_problem() -> None:
    unknown = inspect_file(plugin_path("wat_unknown_import"))
    assert not unknown.ok and unknown.problems == ["import env.proxy_does_not_exist (i32 -> i32): missing import"]
    no_abi = inspect_file(plugin_path("wat_no_abi"))
    assert no_abi.problems == ["Missing or unknown Proxy-Wasm ABI version"]


def test_a_signature_we_do_not_provide_is_a_problem() -> None:
    report = inspect_bytes(wasmtime.wat2wasm(_WRONG_SIGNATURE), "wrong")
    [imp] = report.imports
    assert not imp.supported and imp.problem == "import type mismatch: we provide i32 i32 i32 -> i32"
    assert (report.memory_min_pages, report.memory_max_pages) == (1, 4)


def test_cli_exit_codes_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["inspect", plugin_path("nowasi")]) == 0
    assert "OK: this build can load the plugin" in capsys.readouterr().out
    assert cli_main(["inspect", "--json", plugin_path("wat_unknown_import")]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["imports"][0]["name"] == "proxy_does_not_exist"
    assert cli_main(["inspect", plugin_path("corrupt_garbage")]) == 2
    assert "not a valid Wasm module" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "missing.wasm")]) == 2
    assert "cannot read: No such file or directory" in capsys.readouterr().err


def _bootstrap(*plugins: str) -> bootstrap_pb2.Bootstrap:
    for module in ("envoy.extensions.filters.http.router.v3.router_pb2",  # ParseDict resolves typed_config
                   "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2"):
        importlib.import_module(module)
    filters = [{"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": name, "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                               "code": {"local": {"filename": plugin_path(name)}}}}}}
        for name in plugins]
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager", "stat_prefix": "x", "http_filters": filters}
    listener = {"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}]}
    return json_format.ParseDict({"static_resources": {"listeners": [listener]}}, bootstrap_pb2.Bootstrap())


def test_check_config_plugins_for_validate_mode() -> None:
    assert check_config_plugins(_bootstrap("headers", "as_header")) == []
    messages = check_config_plugins(_bootstrap("headers", "wat_unknown_import", "corrupt_garbage"))
    assert len(messages) == 2
    assert messages[0].startswith("Wasm plugin wat_unknown_import (") and "missing import" in messages[0]
    assert messages[1].startswith("Wasm plugin corrupt_garbage (") and "failed to parse" in messages[1]
