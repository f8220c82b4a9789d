"""capability_restriction_config.allowed_capabilities, differential: the abi_all plugin (which
reports the status of every ABI 0.2.1 host function as x-abi-* response headers) under real
Envoy 1.40 and wasmproxy with only the callbacks and the functions it reports with allowed.
Every other host function must answer the same stub status (InternalFailure) in both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.config import bootstrap, write_yaml
from support.ports import free_ports
from support.processes import EnvoyProcess, WasmproxyProcess
from support.raw_http import RawConnection

pytestmark = pytest.mark.envoy

ALLOWED = [
    "proxy_on_context_create", "proxy_on_vm_start", "proxy_on_configure", "proxy_on_request_headers",
    "proxy_on_response_headers", "proxy_on_done", "proxy_on_delete", "proxy_on_log", "proxy_on_http_call_response",
    "proxy_add_header_map_value", "proxy_log", "proxy_get_header_map_value",
    "fd_write", "environ_sizes_get", "environ_get", "clock_time_get", "proc_exit",
]


def _config(tmp_path: Path, name: str, echo_port: int) -> Path:
    from plugins.build import plugin_path

    listener_port, admin_port = free_ports(2)
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "caps", "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                                 "code": {"local": {"filename": plugin_path("abi_all")}}},
                   "capability_restriction_config": {"allowed_capabilities": {c: {} for c in ALLOWED}}}}}
    doc = bootstrap(listener_port=listener_port, admin_port=admin_port, clusters={"echo": echo_port},
                    virtual_hosts=[{"name": "all", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}],
                    http_filters=[wasm])
    return write_yaml(doc, tmp_path / f"{name}.yaml")


def _abi_headers(proc: Any) -> dict[str, str]:
    with RawConnection("127.0.0.1", proc.listener_ports[0], timeout=10.0) as conn:
        resp = conn.request("GET", "/", host="caps.test")
    assert resp.status == 200, resp.status
    return {k: v for k, v in resp.headers if k.startswith("x-abi-")}


def test_restricted_host_functions_answer_like_envoy(tmp_path: Path, echo_upstream: int) -> None:
    results = {}
    for name, cls in (("envoy", EnvoyProcess), ("wasmproxy", WasmproxyProcess)):
        proc = cls(_config(tmp_path, name, echo_upstream))
        proc.start()
        try:
            results[name] = _abi_headers(proc)
        finally:
            proc.stop()
    assert results["envoy"], "abi_all reported nothing under Envoy"
    # Restricted functions answer InternalFailure (10) in Envoy; the table must be equal.
    assert "10" in results["envoy"].values()
    diff = {k: (results["envoy"].get(k), results["wasmproxy"].get(k))
            for k in results["envoy"].keys() | results["wasmproxy"].keys()
            if results["envoy"].get(k) != results["wasmproxy"].get(k)}
    assert not diff, diff
