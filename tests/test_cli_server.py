"""The `wasmproxy` command and the Server as a user meets them: exit codes, messages, shutdown.

Each behaviour is pinned against real Envoy where Envoy has it (same file, same flags).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.config import bootstrap, static_cluster, write_yaml
from support.ports import free_ports
from support.processes import ENVOY_BIN, WasmproxyProcess
from support.raw_http import RawConnection

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "tests" / "configs" / "front_proxy.yaml"
BROKEN_UNKNOWN_FIELD = """
static_resources:
  clusters:
  - name: a
    connect_timeout: 1s
    type: STATIC
    lb_polcy: ROUND_ROBIN
"""


def _wasmproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wasmproxy", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _envoy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENVOY_BIN), "-l", "critical", *args], capture_output=True, text=True, timeout=60)


def test_validate_good_config_prints_envoys_ok_line_and_exits_0() -> None:
    r = _wasmproxy("--mode", "validate", "-c", str(GOOD))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"configuration '{GOOD}' OK"


def test_validate_broken_config_names_the_field_and_exits_1(tmp_path: Path) -> None:
    path = write_yaml(BROKEN_UNKNOWN_FIELD, tmp_path / "broken.yaml")
    r = _wasmproxy("--mode", "validate", "-c", str(path))
    assert r.returncode == 1
    assert f"error initializing configuration '{path}'" in r.stderr
    assert "static_resources.clusters[0]" in r.stderr and "lb_polcy" in r.stderr


@pytest.mark.envoy
def test_validate_exit_codes_match_envoy(tmp_path: Path) -> None:
    broken = write_yaml(BROKEN_UNKNOWN_FIELD, tmp_path / "broken.yaml")
    for path in (GOOD, broken):
        ours, theirs = _wasmproxy("--mode", "validate", "-c", str(path)), _envoy("--mode", "validate", "-c", str(path))
        assert ours.returncode == theirs.returncode, (path, ours.stderr, theirs.stderr)


def test_validate_missing_file_is_envoys_invalid_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    r = _wasmproxy("--mode", "validate", "-c", str(missing))
    assert r.returncode == 1
    assert f"Invalid path: {missing}" in r.stderr


def test_validate_without_config_checks_the_embedded_demo() -> None:
    r = _wasmproxy("--mode", "validate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("OK")


def test_version_flag() -> None:
    r = _wasmproxy("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("wasmproxy  version: ")


def test_serving_a_config_that_cannot_bind_exits_1_like_envoy(tmp_path: Path) -> None:
    # A STATIC cluster is fine, but a listener on a port another socket holds (without
    # SO_REUSEPORT) cannot bind: start-up fails and the process must exit 1, never half-serve.
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        (admin_port,) = free_ports(1)
        doc = bootstrap(listener_port=port, admin_port=admin_port,
                        virtual_hosts=[{"name": "v", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}])
        path = write_yaml(doc, tmp_path / "busy.yaml")
        r = _wasmproxy("-c", str(path), "--concurrency", "1", "-l", "warning")
    finally:
        holder.close()
    assert r.returncode == 1
    assert "error initializing configuration" in r.stderr


def _serving_config(tmp_path: Path, echo_port: int) -> Path:
    listener_port, admin_port = free_ports(2)
    doc = bootstrap(listener_port=listener_port, admin_port=admin_port,
                    virtual_hosts=[{"name": "v", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}],
                    clusters=[static_cluster("echo", echo_port)])
    return write_yaml(doc, tmp_path / "serve.yaml")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "quitquitquit"])
def test_clean_shutdown_exits_0_after_serving_on_every_worker(tmp_path: Path, echo_upstream: int, how: str) -> None:
    proc = WasmproxyProcess(_serving_config(tmp_path, echo_upstream), concurrency=2)
    with proc:
        proc.wait_ready()
        (listener_port,) = proc.listener_ports
        with RawConnection("127.0.0.1", listener_port) as conn:
            for _ in range(20):
                assert conn.request("GET", "/").status == 200
        stats = proc.admin("/stats").body.decode()
        assert "http.ingress_http.downstream_rq_2xx: 20" in stats
        # Both workers have a Store, so per-worker counters exist and were merged on main.
        if how == "quitquitquit":
            assert proc.admin("/quitquitquit", method="POST").status == 200
        else:
            proc.proc.send_signal(getattr(signal, how))
        assert proc.proc.wait(timeout=10) == 0, proc.log_tail()
        # Workers drop their thread-local objects on the way out without an error.
        assert "Traceback" not in proc.log_text(), proc.log_tail()


def _wasm_config(tmp_path: Path, plugin: Path) -> Path:
    listener_port, admin_port = free_ports(2)
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "p", "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                               "code": {"local": {"filename": str(plugin)}}}}}}
    doc = bootstrap(listener_port=listener_port, admin_port=admin_port, http_filters=[wasm],
                    virtual_hosts=[{"name": "v", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}])
    return write_yaml(doc, tmp_path / "wasm.yaml")


def test_validate_inspects_the_plugins_a_config_references(tmp_path: Path) -> None:
    from plugins.build import plugin_path

    good = _wasmproxy("--mode", "validate", "-c", str(_wasm_config(tmp_path, Path(plugin_path("headers")))))
    assert good.returncode == 0, good.stderr
    bad = _wasmproxy("--mode", "validate", "-c", str(_wasm_config(tmp_path, Path(plugin_path("wat_unknown_import")))))
    assert bad.returncode == 1
    assert "Wasm plugin p" in bad.stderr
