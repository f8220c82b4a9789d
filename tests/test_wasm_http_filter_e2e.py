"""The Wasm HTTP filter end to end: `python -m wasmproxy -c cfg.yaml` next to real Envoy 1.40 on
the same YAML: start-up failures, wasm.* stats in admin, FAIL_RELOAD, env vars, shared queues
across workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from support.config import bootstrap, write_yaml
from support.ports import free_ports
from support.processes import EnvoyProcess, ProxyProcess, WasmproxyProcess
from support.raw_http import RawConnection

pytestmark = pytest.mark.envoy

TARGETS = {"envoy": EnvoyProcess, "wasmproxy": WasmproxyProcess}


def _plugin(name: str) -> str:
    from plugins.build import plugin_path

    return plugin_path(name)


def wasm_filter(plugin: str, configuration: str | None = None, *, name: str | None = None, vm_id: str = "",
                vm_configuration: str | None = None, **extra: Any) -> dict[str, Any]:
    vm: dict[str, Any] = {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": _plugin(plugin)}}}
    if vm_configuration is not None:
        vm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": vm_configuration}
    config: dict[str, Any] = {"name": name or plugin, "vm_config": vm, **extra}
    if configuration is not None:
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration}
    return {"name": "envoy.filters.http.wasm",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                             "config": config}}


def _config(tmp_path: Path, target: str, filters: list[dict[str, Any]], echo_port: int,
            clusters: dict[str, int] | None = None) -> Path:
    listener_port, admin_port = free_ports(2)
    doc = bootstrap(listener_port=listener_port, admin_port=admin_port, clusters={"echo": echo_port, **(clusters or {})},
                    virtual_hosts=[{"name": "all", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}],
                    http_filters=filters)
    return write_yaml(doc, tmp_path / f"{target}.yaml")


def _get(proc: ProxyProcess, path: str = "/", headers: list[tuple[str, str]] | None = None) -> Any:
    with RawConnection("127.0.0.1", proc.listener_ports[0], timeout=5.0) as conn:
        return conn.request("GET", path, headers=headers or [], host="wasm.test")


def _admin_stats(proc: ProxyProcess, prefix: str) -> dict[str, int]:
    with RawConnection("127.0.0.1", proc.admin_port, timeout=5.0) as conn:
        text = conn.request("GET", "/stats", host="admin").body.decode()
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(tmp_path: Path, echo_upstream: int) -> Iterator[Any]:
    procs: list[ProxyProcess] = []

    def start(target: str, filters: list[dict[str, Any]], *, wait: bool = True,
              clusters: dict[str, int] | None = None) -> ProxyProcess:
        proc = TARGETS[target](_config(tmp_path, target, filters, echo_upstream, clusters))
        procs.append(proc)
        if wait:
            proc.start()
        else:
            proc.spawn()
        return proc

    yield start
    for proc in procs:
        proc.stop()


STARTUP_FAILURES = {
    "fail_vm_start": (dict(plugin="trap", vm_configuration="fail_vm_start"), "Failed to start base Wasm"),
    "fail_configure_open": (dict(plugin="trap", configuration="fail_configure", failure_policy="FAIL_OPEN"),
                            "Failed to configure base Wasm plugin"),
    "corrupt": (dict(plugin="corrupt_truncated"), "Failed to parse corrupted Wasm module"),
}


@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_plugin_that_cannot_load_stops_startup_with_exit_1(run: Any, target: str, case: str) -> None:
    kwargs, reason = STARTUP_FAILURES[case]
    kwargs = dict(kwargs)
    plugin = kwargs.pop("plugin")
    proc = run(target, [wasm_filter(plugin, **kwargs)], wait=False)
    assert proc.proc.wait(timeout=30) == 1
    log = proc.log_text()
    assert reason in log
    assert f"Plugin {plugin} failed to load" in log
    assert f"Unable to create Wasm plugin {plugin}" in log


def test_lifecycle_and_reload_stats_match_envoy(run: Any, echo_upstream: int) -> None:
    stats = {}
    for target in TARGETS:
        proc = run(target, [wasm_filter("headers", vm_id="a", name="one"), wasm_filter("headers", "x", vm_id="a", name="two")])
        assert _get(proc).status == 200
        stats[target] = _admin_stats(proc, "wasm.")
    expected = {
        "wasm.envoy.wasm.runtime.v8.created": 5, "wasm.envoy.wasm.runtime.v8.active": 3, "wasm.wasm_vm_count": 3,
        "wasm.one.vm_reload": 0, "wasm.one.vm_reload_backoff": 0, "wasm.one.vm_reload_failure": 0,
        "wasm.one.vm_reload_success": 0,
    }
    for target, got in stats.items():
        for name, value in expected.items():
            assert got.get(name) == value, (target, name, got)
    assert set(stats["wasmproxy"]) >= set(stats["envoy"]) - {"wasm.envoy.wasm.runtime.v8.memory_size"}


def test_fail_reload_rebuilds_the_vm(run: Any, target: str) -> None:
    proc = run(target, [wasm_filter("trap", name="reloading", failure_policy="FAIL_RELOAD",
                                    reload_config={"backoff": {"base_interval": "0.010s"}})])
    assert _get(proc).header("x-trap-requests") == "1"
    assert _get(proc, headers=[("x-trap-phase", "request_headers")]).status == 503
    # Requests within the backoff (10..15 ms after the last load) still get 503; the proxy's own
    # clock decides, so ask until one is let through (bounded).
    for _ in range(500):
        after = _get(proc)
        if after.status != 503:
            break
    assert after.status == 200 and after.header("x-trap-requests") == "1"
    stats = _admin_stats(proc, "wasm.reloading.")
    assert stats["wasm.reloading.vm_reload_success"] == 1 and stats["wasm.reloading.vm_reload_failure"] == 0


class _CodeServer:
    """Serves plugins/out over HTTP on loopback (remote code), counting requests."""

    def __init__(self) -> None:
        import functools
        import threading
        from http.server import HTTPServer, SimpleHTTPRequestHandler

        outer = self
        self.hits = 0

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        directory = str(Path(_plugin("trap")).parent)
        self.server = HTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def code_server() -> Iterator[_CodeServer]:
    server = _CodeServer()
    yield server
    server.stop()


@pytest.mark.parametrize("good_sha", [True, False])
def test_remote_code_with_sha256(run: Any, target: str, code_server: _CodeServer, good_sha: bool) -> None:
    """Envoy 1.40: the right sha256 runs the plugin; a wrong one is fetched twice (one retry),
    then the plugin runs with no VM and fails closed (503); the proxy still starts."""
    import hashlib

    sha = hashlib.sha256(Path(_plugin("trap")).read_bytes()).hexdigest() if good_sha else "00" * 32
    remote = {"http_uri": {"uri": f"http://127.0.0.1:{code_server.port}/trap.wasm", "cluster": "code",
                           "timeout": "2s"},
              "sha256": sha, "retry_policy": {"num_retries": 1, "retry_back_off": {"base_interval": "0.05s"}}}
    filter_ = wasm_filter("trap", name="remote")
    filter_["typed_config"]["config"]["vm_config"]["code"] = {"remote": remote}
    proc = run(target, [filter_], clusters={"code": code_server.port})
    r = _get(proc)
    stats = _admin_stats(proc, "wasm.remote_load")
    if good_sha:
        assert r.status == 200 and r.header("x-trap-plugin") == "alive"
        assert code_server.hits == 1 and stats["wasm.remote_load_fetch_successes"] == 1
    else:
        assert r.status == 503
        assert code_server.hits == 2 and stats["wasm.remote_load_fetch_failures"] == 1
    assert stats["wasm.remote_load_cache_misses"] == 1 and stats["wasm.remote_load_cache_entries"] == 1
