"""Real Envoy 1.40 with the logging plugin: proxy_log levels, get_log_level, WASI stdout/stderr."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    wasm = wasm_filter(plugin("logging"), "my-config", vm_id="logvm", root_id="logroot", name="logplugin")
    with EnvoyRun([Listener("logging", [wasm])], proxy=proxy, extra_args=("--component-log-level", "wasm:debug")) as run:
        yield run


def _wasm_lines(log: str, needle: str) -> list[tuple[str, str]]:
    """(level, message) of Envoy's wasm log lines containing needle."""
    found = []
    for line in log.splitlines():
        m = re.match(r"\[[^]]*\]\[\d+\]\[(\w+)\]\[wasm\] (?:\[[^]]*\] )?(wasm log .*)$", line)
        if m and needle in m.group(2):
            found.append((m.group(1), m.group(2)))
    return found


def test_levels_statuses_and_log_level(envoy: EnvoyRun) -> None:
    r = envoy.request("logging", headers={"x-log-message": "msg1"})
    assert r.header("x-log-status") == "0,0,0,0,0,0"
    assert r.header("x-log-bad-level") == "2"  # BAD_ARGUMENT
    assert r.header("x-log-level") == "0:1"  # the wasm component's level: debug
    lines = _wasm_lines(envoy.log_text(), ": msg1")
    prefix = "wasm log logplugin logroot logvm: logging:"
    assert lines == [
        ("debug", f"{prefix} level 1: msg1"),  # trace (0) is below the component level
        ("info", f"{prefix} level 2: msg1"),
        ("warning", f"{prefix} level 3: msg1"),
        ("error", f"{prefix} level 4: msg1"),
        ("critical", f"{prefix} level 5: msg1"),
        ("info", f"{prefix} stdout: msg1"),  # WASI fd 1, trailing newline stripped
        ("error", f"{prefix} stderr: msg1"),  # WASI fd 2
    ]


def test_root_context_logs_without_plugin_name(envoy: EnvoyRun) -> None:
    lines = _wasm_lines(envoy.log_text(), "logging: configured")
    assert lines and set(lines) == {("info", "wasm log logroot logvm: logging: configured: my-config")}
