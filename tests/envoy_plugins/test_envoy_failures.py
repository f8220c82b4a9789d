"""Real Envoy 1.40 with failing plugins: traps per phase and failure policy, plugins that cannot
start, and the WAT edge cases (bad pointers, unbounded memory.grow, proc_exit, infinite loop)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy

PHASES = ["request_headers", "request_body", "response_headers", "response_body", "log"]
POLICIES = ["FAIL_CLOSED", "FAIL_OPEN", "FAIL_RELOAD"]
MORE_PHASES = ["request_trailers", "response_trailers", "done", "delete"]


def _trap_listener(phase: str, policy: str, config: str = "") -> Listener:
    # A vm_id per listener: a VM that failed is shared by every plugin running in it.
    name = f"{phase}-{policy}"
    wasm = wasm_filter(plugin("trap"), config, vm_id=name, failure_policy=policy, name=name)
    if policy == "FAIL_RELOAD":
        # Envoy reloads only once the backoff has passed since the previous load (startup
        # included): keep it short. (Envoy 1.40 dies with SIGFPE when base_interval is 1ms.)
        wasm["typed_config"]["config"]["reload_config"] = {"backoff": {"base_interval": "0.1s", "max_interval": "0.2s"}}
    return Listener(name, [wasm])


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [_trap_listener(phase, policy) for phase in PHASES for policy in POLICIES]
    listeners += [_trap_listener("tick", policy, "tick 10\ntrap tick") for policy in ("FAIL_CLOSED", "FAIL_OPEN")]
    listeners += [_trap_listener(phase, "FAIL_CLOSED") for phase in MORE_PHASES]
    listeners += [Listener(name, [wasm_filter(plugin(name), vm_id=name)])
                  for name in ("wat_bad_pointers", "wat_memory_grow", "wat_proc_exit")]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def _alive(r: Response) -> bool:
    return r.header("x-trap-plugin") == "alive"


def _is_echo(r: Response) -> bool:
    return r.status == 200 and r.echo()["method"] == "POST"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("phase", ["request_headers", "request_body", "response_headers"])
def test_trap_before_the_response_starts_gives_503(envoy: EnvoyRun, phase: str, policy: str) -> None:
    listener = f"{phase}-{policy}"
    first = envoy.request(listener, "POST", body=b"x", headers={"x-trap-phase": phase})
    assert (first.status, first.body) == (503, b"")
    assert f"Function: proxy_on_{phase} failed: Uncaught RuntimeError: unreachable" in envoy.log_text()
    after = envoy.request(listener, "POST", body=b"x")
    if policy == "FAIL_OPEN":  # the dead VM is skipped: requests pass through unfiltered
        assert _is_echo(after) and not _alive(after)
    elif policy == "FAIL_CLOSED":
        assert after.status == 503
    else:
        _wait_for_reload(envoy, listener, after)


@pytest.mark.parametrize("policy", POLICIES)
def test_trap_in_response_body_resets_the_started_response(envoy: EnvoyRun, policy: str) -> None:
    listener = f"response_body-{policy}"
    first = envoy.request(listener, "POST", body=b"x", headers={"x-trap-phase": "response_body"})
    assert first.status == 200 and _alive(first)
    assert len(first.body) < int(first.header("content-length") or 0)
    _check_after_late_trap(envoy, listener, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_trap_in_on_log_spares_the_response_but_not_the_vm(envoy: EnvoyRun, policy: str) -> None:
    listener = f"log-{policy}"
    first = envoy.request(listener, "POST", body=b"x", headers={"x-trap-phase": "log"})
    assert _is_echo(first) and _alive(first)
    _check_after_late_trap(envoy, listener, policy)


def _check_after_late_trap(envoy: EnvoyRun, listener: str, policy: str) -> None:
    after = envoy.request(listener, "POST", body=b"x")
    if policy == "FAIL_CLOSED":
        assert after.status == 503
    elif policy == "FAIL_OPEN":
        assert _is_echo(after) and not _alive(after)
    else:
        _wait_for_reload(envoy, listener, after)


def _wait_for_reload(envoy: EnvoyRun, listener: str, after: Response) -> None:
    """FAIL_RELOAD: 503 until the backoff passes, then a fresh VM (its request counter restarts)."""
    deadline = time.monotonic() + 5.0
    while after.status == 503:
        assert time.monotonic() < deadline, "no reload within 5 s"
        time.sleep(0.02)  # Envoy's backoff runs on its own clock
        after = envoy.request(listener, "POST", body=b"x")
    assert _is_echo(after) and after.header("x-trap-requests") == "1"
    assert envoy.request(listener, "POST", body=b"x").header("x-trap-requests") == "2"
    assert envoy.stat(f"wasm.{listener}.vm_reload_success") == 1


@pytest.mark.parametrize("phase", MORE_PHASES)
def test_trap_in_trailers_done_and_delete(envoy: EnvoyRun, phase: str) -> None:
    listener = f"{phase}-FAIL_CLOSED"
    kwargs: dict[str, Any] = {"body": [b"x"], "trailers": [("rt", "1")]}
    trapping = {"x-trap-phase": phase, "x-echo-trailers": "t=1"}
    if phase == "request_trailers":
        r = envoy.request(listener, "POST", headers=trapping, **kwargs)
        assert (r.status, r.body) == (503, b"")
    elif phase == "response_trailers":  # the response has started: the stream is reset
        with pytest.raises(ConnectionError):
            envoy.request(listener, "POST", headers=trapping, **kwargs)
    else:  # after the response: it is complete, trailers included
        r = envoy.request(listener, "POST", headers=trapping, **kwargs)
        assert _alive(r) and r.echo()["method"] == "POST" and r.trailers == [("t", "1")]
        _wait_for_log(envoy, f"Function: proxy_on_{phase} failed: Uncaught RuntimeError: unreachable")
    assert envoy.request(listener, "POST", **kwargs).status == 503


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_OPEN"])
def test_trap_in_on_tick_kills_the_vm(envoy: EnvoyRun, policy: str) -> None:
    _wait_for_log(envoy, "Function: proxy_on_tick failed: Uncaught RuntimeError: unreachable")
    after = envoy.request(f"tick-{policy}", "POST", body=b"x")
    if policy == "FAIL_CLOSED":
        assert after.status == 503
    else:
        assert _is_echo(after) and not _alive(after)


def _wait_for_log(envoy: EnvoyRun, text: str, deadline_s: float = 5.0) -> None:
    deadline = time.monotonic() + deadline_s
    while text not in envoy.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged within {deadline_s}s"
        time.sleep(0.02)  # Envoy's tick timer runs on its own clock


def test_bad_pointers_get_invalid_memory_access(envoy: EnvoyRun) -> None:
    r = envoy.request("wat_bad_pointers")
    assert r.status == 200
    for name in ("log", "log-len", "get-key", "get-out", "add-value", "property", "time", "shared-key",
                 "metric-name"):
        assert r.header(f"x-bad-{name}") == "6", name  # WasmResult::InvalidMemoryAccess
    assert r.header("x-bad-fd-write") == "21"  # WASI errno FAULT
    assert envoy.request("wat_bad_pointers").status == 200  # the VM is still fine


def test_memory_grow_stops_at_one_gib(envoy: EnvoyRun) -> None:
    r = envoy.request("wat_memory_grow")
    assert (r.status, r.header("x-memory-pages")) == (200, "16384")


def test_proc_exit_returns_and_the_vm_keeps_working(envoy: EnvoyRun) -> None:
    for _ in range(2):
        r = envoy.request("wat_proc_exit")
        assert r.status == 200 and r.echo_header("x-after-proc-exit") == "1"


STARTUP_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "fail_vm_start": (wasm_filter(plugin("trap"), vm_configuration="fail_vm_start"), "Failed to start base Wasm"),
    "trap_vm_start": (wasm_filter(plugin("trap"), vm_configuration="trap_vm_start"),
                      "Function: proxy_on_vm_start failed: Uncaught RuntimeError: unreachable"),
    "fail_configure": (wasm_filter(plugin("trap"), "fail_configure"), "Failed to configure base Wasm plugin"),
    "fail_configure_open": (wasm_filter(plugin("trap"), "fail_configure", failure_policy="FAIL_OPEN"),
                            "Failed to configure base Wasm plugin"),
    "trap_configure": (wasm_filter(plugin("trap"), "trap_configure"),
                       "Function: proxy_on_configure failed: Uncaught RuntimeError: unreachable"),
    "no_abi": (wasm_filter(plugin("wat_no_abi")), "Missing or unknown Proxy-Wasm ABI version"),
    "unknown_import": (wasm_filter(plugin("wat_unknown_import")),
                       "Failed to load Wasm module due to a missing import: env.proxy_does_not_exist"),
    "corrupt_truncated": (wasm_filter(plugin("corrupt_truncated")), "Failed to parse corrupted Wasm module"),
    "corrupt_garbage": (wasm_filter(plugin("corrupt_garbage"), failure_policy="FAIL_OPEN"),
                        "Failed to parse corrupted Wasm module"),
}


@pytest.fixture(scope="module")
def startup_failures(proxy: str) -> Iterator[dict[str, tuple[int, str]]]:
    """Start one Envoy per case, all at once, and collect each exit code and log."""
    runs = {case: EnvoyRun([Listener("l", [wasm])], proxy=proxy) for case, (wasm, _) in STARTUP_FAILURES.items()}
    try:
        for run in runs.values():
            run.start(wait_ready=False)
        yield {case: (run.wait_exit(), run.log_text()) for case, run in runs.items()}
    finally:
        for run in runs.values():
            run.stop()


@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_plugin_that_cannot_start_fails_envoy_startup(startup_failures: dict[str, tuple[int, str]],
                                                     case: str) -> None:
    """Every policy, FAIL_OPEN included: a static listener whose plugin fails to load is fatal."""
    wasm, reason = STARTUP_FAILURES[case]
    exit_code, log = startup_failures[case]
    assert exit_code == 1
    assert reason in log
    assert f"Unable to create Wasm plugin {wasm['typed_config']['config']['name']}" in log


def test_infinite_loop_hangs_the_worker_but_not_admin(proxy: str) -> None:
    """Envoy has no CPU limit: the worker spins forever; wasmproxy interrupts the plugin."""
    run = EnvoyRun([Listener("loop", [wasm_filter(plugin("wat_infinite_loop"))])], proxy=proxy)
    try:
        run.start()
        if proxy == "wasmproxy":  # on purpose (docs/compatibility.md): a CPU deadline traps the plugin
            r = run.request("loop", timeout=5.0)
            assert (r.status, r.body) == (503, b"")
            assert "the plugin exceeded its CPU deadline" in run.log_text()
        else:
            with pytest.raises(TimeoutError):
                run.request("loop", timeout=1.0)
        assert run.admin("/ready").strip() == "LIVE"
    finally:
        run.stop(terminate_timeout=0.5)  # the stuck worker never lets Envoy exit on SIGTERM
