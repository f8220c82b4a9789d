"""Sandbox limits end to end: `python -m wasmproxy` with --wasm-callback-deadline-ms and
--wasm-memory-limit-mb, one worker, two listeners: one runs the infinite-loop plugin, the
other the unbounded-memory plugin. The looping request gets 503 within about the deadline and
the same worker goes on serving the other listener."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from support.config import bootstrap, write_yaml
from support.ports import free_ports
from support.processes import WasmproxyProcess
from support.raw_http import RawConnection

DEADLINE_MS = 50


def _wasm_filter(plugin: str, name: str) -> dict[str, Any]:
    from plugins.build import plugin_path

    return {"name": "envoy.filters.http.wasm",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                             "config": {"name": name, "vm_config": {
                                 "runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": plugin_path(plugin)}}}}}}


class _SandboxedProxy(WasmproxyProcess):
    def argv(self) -> list[str]:
        return [*super().argv(), "--wasm-callback-deadline-ms", str(DEADLINE_MS), "--wasm-memory-limit-mb", "16"]


def _get(port: int, path: str = "/") -> Any:
    with RawConnection("127.0.0.1", port, timeout=10.0) as conn:
        return conn.request("GET", path, host="sandbox.test")


def test_looping_plugin_fails_its_request_and_the_worker_keeps_serving(tmp_path: Path, echo_upstream: int) -> None:
    loop_port, memory_port, admin_port = free_ports(3)
    doc = bootstrap(listener_port=loop_port, admin_port=admin_port, clusters={"echo": echo_upstream},
                    virtual_hosts=[{"name": "all", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}],
                    http_filters=[_wasm_filter("wat_infinite_loop", "looping")])
    second = copy.deepcopy(doc["static_resources"]["listeners"][0])
    second["name"] = "listener_memory"
    second["address"]["socket_address"]["port_value"] = memory_port
    hcm = second["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0] = _wasm_filter("wat_memory_grow", "growing")
    doc["static_resources"]["listeners"].append(second)
    proc = _SandboxedProxy(write_yaml(doc, tmp_path / "sandbox.yaml"), concurrency=1)
    proc.start()
    try:
        started = time.monotonic()
        looped = _get(loop_port, "/loop")
        elapsed = time.monotonic() - started
        assert looped.status == 503, proc.log_tail()
        assert elapsed < 5.0  # about the deadline (plus a tick), never hung
        log = proc.log_text()
        assert "Function: proxy_on_request_headers failed: Uncaught RuntimeError: interrupted" in log, log

        grown = _get(memory_port, "/grow")
        assert grown.status == 200 and grown.header("x-memory-pages") == "256"  # 16 MiB
        assert _get(loop_port).status == 503  # FAIL_CLOSED: the looping plugin's VM stays failed
        assert _get(memory_port).status == 200
    finally:
        proc.stop()
