"""Live config reload (wasmproxy.reload): SIGHUP and --watch-config re-read the bootstrap.

The proxy runs as a child process (--concurrency 2) behind the session's echo upstream. Waits
are on events (a client seeing a response header) or bounded polls of admin stats; the poll
interval is the wait on the child process, which also notices an early exit.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from support.config import bootstrap, static_cluster, write_yaml
from support.ports import can_connect, free_ports
from support.processes import WasmproxyProcess

PLUGIN_CREATED = "wasm.envoy.wasm.runtime.v8.created"
PLUGIN_ACTIVE = "wasm.envoy.wasm.runtime.v8.active"


def _plugin_filter(plugin: str, value: str) -> dict[str, Any]:
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "headers", "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                                     "code": {"local": {"filename": plugin}}},
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": f"response_headers add response_headers x-plugin {value}"}}}}


def _doc(ports: dict[str, int], version: int, *, plugin: str | None = None, plugin_value: str = "p1",
         cluster: str = "echo", extra_listener: bool = False, main_listener: bool = True) -> dict[str, Any]:
    """Version `version` of the config: a response header names it; odd versions add a route."""
    routes: list[dict[str, Any]] = [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]
    if version % 2:
        routes.insert(0, {"match": {"path": "/only-odd"},
                          "direct_response": {"status": 200, "body": {"inline_string": "odd"}}})
    doc = bootstrap(
        listener_port=ports["listener"], admin_port=ports["admin"],
        virtual_hosts=[{"name": "v", "domains": ["*"], "routes": routes}],
        clusters=[static_cluster("echo", ports["echo"]), static_cluster("echo2", ports["echo"])],
        http_filters=[_plugin_filter(plugin, plugin_value)] if plugin else [],
        route_config={"response_headers_to_add": [{"header": {"key": "x-config-version", "value": str(version)}}]},
    )
    listeners = doc["static_resources"]["listeners"]
    if extra_listener:
        extra = dict(listeners[0], name="listener_1")
        extra["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": ports["listener2"]}}
        listeners.append(extra)
    if not main_listener:
        listeners.pop(0)
    return doc


def _write(path: Path, doc: dict[str, Any] | str) -> None:
    """Replace the config atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    write_yaml(doc, tmp)
    os.replace(tmp, path)


def _stats(proc: WasmproxyProcess) -> dict[str, int]:
    out = {}
    for line in proc.admin("/stats").body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def _wait_for(proc: WasmproxyProcess, what: str, pred: Callable[[], bool], deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    assert proc.proc is not None
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{proc.log_tail()}")
        try:
            code = proc.proc.wait(timeout=0.02)
        except Exception:
            continue
        raise AssertionError(f"wasmproxy exited with {code}\n{proc.log_tail()}")


def _stat_is(proc: WasmproxyProcess, name: str, value: int) -> Callable[[], bool]:
    return lambda: _stats(proc).get(name, 0) == value


def _get(port: int, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture
def ports(echo_upstream: int) -> dict[str, int]:
    listener, listener2, admin = free_ports(3)
    return {"listener": listener, "listener2": listener2, "admin": admin, "echo": echo_upstream}


class _Load:
    """Client threads sending requests until stopped (or a deadline), on keep-alive connections
    or on a new connection each.

    Each thread alternates `/` (routed to the echo upstream) and `/only-odd` (answered "odd"
    directly by odd config versions, routed to the echo upstream by even ones).
    """

    def __init__(self, port: int, threads: int, deadline_s: float, keep_alive: bool = True) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self.deadline = time.monotonic() + deadline_s
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.max_version = -1
        self.requests = 0
        self.errors: list[str] = []
        self.odd_direct = 0  # /only-odd answered by the odd versions' direct_response
        self.odd_routed = 0  # /only-odd routed to the echo upstream by even versions
        self.plugin_values: set[str] = set()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "_Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def wait_version(self, version: int, timeout: float = 15.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.max_version >= version, timeout)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            path = "/only-odd" if n % 2 else "/"
            n += 1
            try:
                if not self.keep_alive:  # a new connection per request
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                version = int(r.getheader("x-config-version", "-1"))
                plugin = r.getheader("x-plugin")
            except Exception as e:  # any failure is a dropped request
                with self.cond:
                    self.requests += 1
                    self.errors.append(f"{path}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            with self.cond:
                self.requests += 1
                if r.status != 200 or version < 0:
                    self.errors.append(f"{path}: {r.status} version={version} {body[:100]!r}")
                if path == "/only-odd":
                    if body == b"odd":
                        self.odd_direct += 1
                    else:
                        self.odd_routed += 1
                if plugin:
                    self.plugin_values.add(plugin)
                if version > self.max_version:
                    self.max_version = version
                    self.cond.notify_all()
        conn.close()


RELOADS = 50


def test_fifty_reloads_under_load_drop_no_request(tmp_path: Path, ports: dict[str, int]) -> None:
    from plugins.build import plugin_path

    plugin = plugin_path("headers")
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0, plugin=plugin))
    with WasmproxyProcess(path, concurrency=2) as proc:
        created = _stats(proc)[PLUGIN_CREATED]
        started = time.monotonic()
        with _Load(ports["listener"], threads=4, deadline_s=120) as load:
            assert load.wait_version(0), proc.log_tail()
            for version in range(1, RELOADS + 1):
                _write(path, _doc(ports, version, plugin=plugin))
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGHUP)
                assert load.wait_version(version), f"version {version} never served\n{proc.log_tail()}"
            # A few more requests on the last version, then stop.
            with load.cond:
                target = load.requests + 20
                assert load.cond.wait_for(lambda: load.requests >= target or load.errors, 15)
        duration = time.monotonic() - started
        stats = _stats(proc)
    print(f"\nreload under load: {load.requests} requests, {len(load.errors)} errors, {RELOADS} reloads, "
          f"{duration:.1f} s")
    assert load.errors == [], load.errors[:10]
    assert stats["server.reload_success"] == RELOADS
    assert stats.get("server.reload_failed", 0) == 0
    assert stats["listener_manager.listener_modified"] == RELOADS
    assert stats["listener_manager.listener_in_place_updated"] == RELOADS
    # Both route tables served: /only-odd answered directly by odd versions and routed by even ones.
    assert load.odd_direct > 0 and load.odd_routed > 0
    assert load.plugin_values == {"p1"}
    # Only routes changed: the Wasm filter (its base VM and per-worker clones) was reused.
    assert stats[PLUGIN_CREATED] == created
    assert stats.get("http.ingress_http.downstream_rq_5xx", 0) == 0


def test_a_listener_replaced_on_its_address_loses_no_connection(tmp_path: Path, ports: dict[str, int]) -> None:
    """A new stat_prefix replaces the listener (not in place); on the same address the new one
    takes over the listening socket, so connections being accepted are not reset."""
    path = tmp_path / "envoy.yaml"

    def doc(version: int) -> dict[str, Any]:
        d = _doc(ports, version)
        d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "stat_prefix"] = f"ingress_{version % 2}"
        return d

    _write(path, doc(0))
    replacements = 10
    with WasmproxyProcess(path, concurrency=2) as proc, _Load(ports["listener"], threads=3, deadline_s=90,
                                                              keep_alive=False) as load:
        assert proc.proc is not None
        assert load.wait_version(0), proc.log_tail()
        for version in range(1, replacements + 1):
            _write(path, doc(version))
            proc.proc.send_signal(signal.SIGHUP)
            assert load.wait_version(version), f"version {version} never served\n{proc.log_tail()}"
        stats = _stats(proc)
    assert load.errors == [], load.errors[:10]
    assert stats["listener_manager.listener_modified"] == replacements
    assert stats["listener_manager.listener_in_place_updated"] == 0
    assert stats["http.ingress_0.downstream_rq_2xx"] > 0 and stats["http.ingress_1.downstream_rq_2xx"] > 0


def test_rejected_config_keeps_the_old_one_serving(tmp_path: Path, ports: dict[str, int]) -> None:
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0))
    with WasmproxyProcess(path, concurrency=2) as proc:
        assert _get(ports["listener"])[1]["x-config-version"] == "0"
        # A route to a cluster the config does not have fails validation.
        _write(path, _doc(ports, 1, cluster="missing"))
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "server.reload_failed 1", _stat_is(proc, "server.reload_failed", 1))
        # Unparseable YAML is rejected too.
        _write(path, "static_resources: {listeners: [")
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "server.reload_failed 2", _stat_is(proc, "server.reload_failed", 2))
        for _ in range(4):  # both workers keep the old config
            status, headers, _ = _get(ports["listener"])
            assert (status, headers["x-config-version"]) == (200, "0")
        assert "config reload rejected" in proc.log_text()
        assert "missing" in proc.log_text()
        assert _stats(proc).get("server.reload_success", 0) == 0
        # A good config is then applied.
        _write(path, _doc(ports, 2))
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "server.reload_success 1", _stat_is(proc, "server.reload_success", 1))
        assert _get(ports["listener"])[1]["x-config-version"] == "2"


def test_listeners_and_clusters_are_added_changed_and_removed(tmp_path: Path, ports: dict[str, int]) -> None:
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0))
    with WasmproxyProcess(path, concurrency=2) as proc:
        assert proc.proc is not None
        # A new listener starts on every worker; a new route uses a changed cluster.
        doc = _doc(ports, 1, extra_listener=True, cluster="echo2")
        doc["static_resources"]["clusters"][1]["connect_timeout"] = "2s"  # a modified cluster
        _write(path, doc)
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "first reload", _stat_is(proc, "server.reload_success", 1))
        for port in (ports["listener"], ports["listener2"]):
            for _ in range(4):
                status, headers, body = _get(port)
                assert (status, headers["x-config-version"]) == (200, "1")
                assert b'"path": "/"' in body or b'"path":"/"' in body  # the echo upstream answered
        stats = _stats(proc)
        assert stats["listener_manager.listener_added"] == 2  # the first one at start-up, as Envoy
        assert f"listener_1::127.0.0.1:{ports['listener2']}" in proc.admin("/listeners").body.decode()
        assert "listener_1" in proc.admin("/config_dump").body.decode()
        assert stats["cluster_manager.cluster_modified"] == 1
        # Removing listener_0 stops it accepting on every worker; listener_1 keeps serving.
        _write(path, _doc(ports, 2, extra_listener=True, main_listener=False))
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "second reload", _stat_is(proc, "server.reload_success", 2))
        assert not can_connect(ports["listener"])
        assert _get(ports["listener2"])[1]["x-config-version"] == "2"
        assert _stats(proc)["listener_manager.listener_removed"] == 1
        # Removing a cluster.
        doc = _doc(ports, 3, extra_listener=True, main_listener=False)
        del doc["static_resources"]["clusters"][1]
        _write(path, doc)
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "third reload", _stat_is(proc, "server.reload_success", 3))
        stats = _stats(proc)
        assert stats["cluster_manager.cluster_removed"] == 1
        assert stats["cluster_manager.active_clusters"] == 1
        assert _get(ports["listener2"])[0] == 200


def test_changed_plugin_config_builds_a_new_vm(tmp_path: Path, ports: dict[str, int]) -> None:
    from plugins.build import plugin_path

    plugin = plugin_path("headers")
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0, plugin=plugin))
    with WasmproxyProcess(path, concurrency=2) as proc:
        assert _get(ports["listener"])[1]["x-plugin"] == "p1"
        created = _stats(proc)[PLUGIN_CREATED]
        active = _stats(proc)[PLUGIN_ACTIVE]  # the base VM and one clone per worker
        assert proc.proc is not None
        # An HCM field other than routes changes; the filter chain does not: the plugin is kept.
        doc = _doc(ports, 1, plugin=plugin)
        doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "server_name"] = "reloaded"
        _write(path, doc)
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "first reload", _stat_is(proc, "server.reload_success", 1))
        for _ in range(4):
            _, headers, _ = _get(ports["listener"])
            assert (headers["server"], headers["x-plugin"]) == ("reloaded", "p1")
        assert _stats(proc)[PLUGIN_CREATED] == created
        # The plugin's configuration changes.
        _write(path, _doc(ports, 2, plugin=plugin, plugin_value="p2"))
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "second reload", _stat_is(proc, "server.reload_success", 2))
        for _ in range(4):
            assert _get(ports["listener"])[1]["x-plugin"] == "p2"
        # A new vm_key (the configuration is part of it): a new base VM, its canary and clones.
        assert _stats(proc)[PLUGIN_CREATED] > created
        # The replaced plugin's VMs (its base and every worker's clone) are destroyed.
        _wait_for(proc, "the old plugin's VMs to go", _stat_is(proc, PLUGIN_ACTIVE, active))


class _WatchingProcess(WasmproxyProcess):
    def argv(self) -> list[str]:
        return [*super().argv(), "--watch-config"]


def test_watch_config_reloads_when_the_file_changes(tmp_path: Path, ports: dict[str, int]) -> None:
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0))
    with _WatchingProcess(path, concurrency=2) as proc:
        _write(path, _doc(ports, 1))
        _wait_for(proc, "reload on file change", _stat_is(proc, "server.reload_success", 1))
        assert _get(ports["listener"])[1]["x-config-version"] == "1"


def test_a_moved_listener_drains_its_connections_on_the_old_address(tmp_path: Path, ports: dict[str, int]) -> None:
    path = tmp_path / "envoy.yaml"
    _write(path, _doc(ports, 0))
    with WasmproxyProcess(path, concurrency=2) as proc:
        assert proc.proc is not None
        result: dict[str, Any] = {}
        reloaded = threading.Event()

        def slow_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", ports["listener"], timeout=30)
            conn.request("GET", "/", headers={"x-echo-delay-ms": "2000"})
            r = conn.getresponse()
            result.update(status=r.status, connection=r.getheader("connection"), body=r.read(),
                          version=r.getheader("x-config-version"),
                          after_reload=reloaded.is_set())
            conn.close()

        client = threading.Thread(target=slow_request, daemon=True)
        client.start()
        _wait_for(proc, "the request in flight", _stat_is(proc, "http.ingress_http.downstream_rq_active", 1))
        doc = _doc(ports, 1)
        doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = ports["listener2"]
        _write(path, doc)
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "reload", _stat_is(proc, "server.reload_success", 1))
        reloaded.set()
        assert not can_connect(ports["listener"])  # the old address stopped accepting on every worker
        assert _get(ports["listener2"])[1]["x-config-version"] == "1"
        client.join(30)
        # The request in flight finished on the old listener and its old config, then the
        # connection closed (drain).
        assert result["status"] == 200 and result["after_reload"], result
        assert result["version"] == "0"
        assert result["connection"] == "close"
        stats = _stats(proc)
        assert stats["listener_manager.listener_modified"] == 1
        assert stats["http.ingress_http.downstream_cx_drain_close"] >= 1
