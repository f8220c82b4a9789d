"""Conformance suite: "your Envoy Wasm plugins and config run unchanged and behave the same".

Every case here runs on real Envoy 1.40 and on wasmproxy with the very same bootstrap YAML
(tests/diff_cases/conformance_*.yaml, format in tests/support/cases.py) and compares status,
headers and body after normalising only what is volatile. Beyond request/response pairs it
compares what users script or alert on: admin /stats (text and Prometheus) after the same
requests, the plugins' log lines, a queue resuming a request paused on another connection, and
the exit of a proxy whose plugin cannot start. Each proxy process is started once per module.
Divergences kept on purpose are listed in docs/compatibility.md; everything else is a bug.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.cases import (CANDIDATE, PROCESS_CLASSES, REFERENCE, Case, CaseFile, DiffEnvironment, RequestSpec,
                           Result, Target, case_params, check_case, selected_targets)
from support.config import bootstrap, write_yaml
from support.ports import LOOPBACK, free_port, free_ports
from support.processes import REPO, EnvoyProcess, ProxyProcess, WasmproxyProcess
from support.raw_http import PeerClosed, RawConnection, build_request

pytestmark = pytest.mark.envoy

CASES_DIR = Path(__file__).parent / "diff_cases"
FILTERS = CaseFile.load(CASES_DIR / "conformance_filters.yaml")
SHARED = CaseFile.load(CASES_DIR / "conformance_shared.yaml")
FAIL_RELOAD = CaseFile.load(CASES_DIR / "conformance_fail_reload.yaml")
FAIL_OPEN_LOG = CaseFile.load(CASES_DIR / "conformance_fail_open_log.yaml")
PLUGINS = ("headers", "headers_abi020", "as_header", "nowasi", "body", "local_reply", "pause", "props", "metrics",
           "logging", "shared", "trap", "wat_no_abi", "corrupt_garbage")
# The plugins' own log lines (not the proxies' ones) at every level, including trace.
LOG_ARGS = ("--component-log-level", "wasm:trace")
# A proxy whose plugin cannot start must exit within this.
EXIT_DEADLINE_S = 30.0


class _ExtraArgs(ProxyProcess):
    """A proxy started with extra command-line flags (the same ones on both)."""

    extra_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [*super().argv(), *self.extra_args]


class ConformanceEnvoy(_ExtraArgs, EnvoyProcess):
    pass


class ConformanceWasmproxy(_ExtraArgs, WasmproxyProcess):
    pass


CLASSES: dict[str, type[ProxyProcess]] = {REFERENCE: ConformanceEnvoy, CANDIDATE: ConformanceWasmproxy,
                                           "envoy-twin": ConformanceEnvoy}


class ConformanceEnvironment(DiffEnvironment):
    """DiffEnvironment whose proxies run with `concurrency` workers and the wasm trace log."""

    def __init__(self, case_file: CaseFile, workdir: Path, echo_port: int, concurrency: int = 1) -> None:
        super().__init__(case_file, workdir, echo_port, free_port())
        self.concurrency = concurrency

    def _spawn(self, name: str) -> Target:
        port_keys = ["listener_port", "admin_port", *self.case_file.extra_ports()]
        ports = dict(zip(port_keys, free_ports(len(port_keys))))
        text = self.case_file.render({**self.shared, **ports})
        path = write_yaml(text, self.workdir / f"{self.case_file.path.stem}.{name}.yaml")
        process = CLASSES[name](path, concurrency=self.concurrency, log_level="warning")
        assert isinstance(process, _ExtraArgs)
        process.extra_args = LOG_ARGS
        process.spawn()
        return Target(name, process, ports["listener_port"], {v: k for k, v in ports.items()})


def _environment(case_file: CaseFile, tmp_path_factory: pytest.TempPathFactory, echo_port: int,
                 concurrency: int = 1) -> Iterator[ConformanceEnvironment]:
    from plugins.build import build

    build(list(PLUGINS))  # the configs point at plugins/out
    workdir = tmp_path_factory.mktemp(case_file.path.stem)
    with ConformanceEnvironment(case_file, workdir, echo_port, concurrency) as env:
        yield env


@pytest.fixture(scope="module")
def filters_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[ConformanceEnvironment]:
    yield from _environment(FILTERS, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[ConformanceEnvironment]:
    yield from _environment(SHARED, tmp_path_factory, echo_upstream, concurrency=2)


@pytest.fixture(scope="module")
def fail_reload_env(tmp_path_factory: pytest.TempPathFactory,
                    echo_upstream: int) -> Iterator[ConformanceEnvironment]:
    yield from _environment(FAIL_RELOAD, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def fail_open_log_env(tmp_path_factory: pytest.TempPathFactory,
                      echo_upstream: int) -> Iterator[ConformanceEnvironment]:
    yield from _environment(FAIL_OPEN_LOG, tmp_path_factory, echo_upstream)


# --- request/response cases ------------------------------------------------------------------

@pytest.mark.parametrize("case", case_params(FILTERS))
def test_filter_chain(filters_env: ConformanceEnvironment, case: Case) -> None:
    filters_env.run(case)


@pytest.mark.parametrize("case", case_params(SHARED))
def test_shared_vm_and_data_across_workers(shared_env: ConformanceEnvironment, case: Case) -> None:
    shared_env.run(case)


@pytest.mark.parametrize("case", case_params(FAIL_RELOAD))
def test_fail_reload(fail_reload_env: ConformanceEnvironment, case: Case) -> None:
    fail_reload_env.run(case)


@pytest.mark.parametrize("case", case_params(FAIL_OPEN_LOG))
def test_fail_open_after_a_trap_in_on_log(fail_open_log_env: ConformanceEnvironment, case: Case) -> None:
    fail_open_log_env.run(case)


# --- pause on one connection, resumed by a queue item from another ---------------------------

QUEUE_WAITER = RequestSpec(path="/queue/wait", headers=[("x-pause-request", "queue")],
                           expect={"status": 200, "echo": {"headers": {"x-resumed-by": "queue",
                                                                       "x-queue-item": "from-b"}}})
QUEUE_SENDER = RequestSpec(path="/queue/send", headers=[("x-pause-enqueue", "from-b")], expect={"status": 200})
# Bound on admin polls while waiting for the first request to pause (each poll is one round trip).
PAUSE_POLLS = 2000


def _stat(target: Target, name: str) -> int | None:
    """One counter or gauge from admin /stats (None when absent)."""
    for line in target.process.admin(f"/stats?filter=^{re.escape(name)}$").body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return None


def _queue_exchange(target: Target) -> list[Result]:
    """A pauses on the queue; once the plugin's pause_waiting gauge shows it, B enqueues."""
    with target.connect() as a, target.connect() as b:
        a.send(build_request(QUEUE_WAITER.method, QUEUE_WAITER.path, QUEUE_WAITER.headers))
        for _ in range(PAUSE_POLLS):  # admin round trips pace the poll; no sleeping
            if _stat(target, "wasmcustom.pause_waiting") == 1:
                break
        else:
            raise AssertionError(f"{target.name}: the request never paused")
        b.send(build_request(QUEUE_SENDER.method, QUEUE_SENDER.path, QUEUE_SENDER.headers))
        sent = b.read_response()
        waited = a.read_response()
    return [Result(waited, None), Result(sent, None)]


def test_queue_item_resumes_a_request_paused_on_another_connection(filters_env: ConformanceEnvironment) -> None:
    case = Case("queue_resumes_across_connections", [QUEUE_WAITER, QUEUE_SENDER])
    with ThreadPoolExecutor(max_workers=len(filters_env.targets)) as pool:
        futures = {n: pool.submit(_queue_exchange, t) for n, t in filters_env.targets.items()}
        results = {n: f.result() for n, f in futures.items()}
    check_case(case, results, {n: t.normaliser(case) for n, t in filters_env.targets.items()})


# --- admin output users script against ---------------------------------------------------------

STATS_REQUESTS = Case("stats", [
    RequestSpec(path="/stats/1", headers=[("x-metrics-gauge-set", "11")]),
    RequestSpec(path="/stats/2", headers=[("x-metrics-gauge-add", "4"), ("x-metrics-record", "5")]),
    RequestSpec(path="/stats/3", headers=[("x-local-reply-phase", "request_headers"),
                                          ("x-local-reply-status", "403")]),
    RequestSpec(path="/stats/4", headers=[("x-echo-status", "503")]),
    RequestSpec(path="/stats/5", headers=[("x-pause-request", "http_call")]),
])
# Text /stats lines compared (histogram quantiles wait for a stats flush: only their names).
STAT_PREFIXES = ("wasmcustom.", "wasm.", "http.ingress_http.downstream_rq_", "cluster.echo.upstream_rq_")
# Skipped: timings, and pending_total (whether a pooled connection was free yet is a race).
STAT_SKIP = ("cluster.echo.upstream_rq_time", "http.ingress_http.downstream_rq_time",
             "cluster.echo.upstream_rq_pending_total")
CUSTOM_METRICS = ("conformance_requests", "conformance_gauge", "pause_waiting")


def _text_stats(target: Target) -> dict[str, str]:
    resp = target.process.admin("/stats")
    assert resp.status == 200, f"{target.name}: /stats answered {resp.status}"
    out = {}
    for line in resp.body.decode().splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(STAT_PREFIXES) and not name.startswith(STAT_SKIP):
            histogram = value.startswith("P0(") or value == "No recorded values"
            out[name] = "<histogram>" if histogram else value
    return out


def _diff(ref: dict[str, str], got: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (ref.get(k), got.get(k)) for k in sorted(ref.keys() | got.keys()) if ref.get(k) != got.get(k)}


def _prometheus_custom(target: Target) -> list[str]:
    resp = target.process.admin("/stats/prometheus")
    assert resp.status == 200, f"{target.name}: /stats/prometheus answered {resp.status}"
    wanted = re.compile(rf"^(# TYPE )?({'|'.join(CUSTOM_METRICS)}|conformance_histogram)[ {{]")
    return sorted(line for line in resp.body.decode().splitlines()
                  if wanted.match(line) and "_bucket" not in line and "_sum" not in line and "_count" not in line)


def test_admin_stats_and_prometheus_match(filters_env: ConformanceEnvironment) -> None:
    filters_env.run(STATS_REQUESTS)
    text = {n: _text_stats(t) for n, t in filters_env.targets.items()}
    prom = {n: _prometheus_custom(t) for n, t in filters_env.targets.items()}
    for name in text:
        for metric in CUSTOM_METRICS:
            assert f"wasmcustom.{metric}" in text[name], f"{name}: no wasmcustom.{metric} in /stats"
            assert f"# TYPE {metric} {'counter' if metric.endswith('requests') else 'gauge'}" in prom[name], name
        assert text[name]["wasmcustom.conformance_gauge"] == "15", name
    if REFERENCE in text:
        for name in text:
            diff = _diff(text[REFERENCE], text[name])
            assert not diff, f"/stats differ ({REFERENCE}, {name}): {diff}"
            assert prom[name] == prom[REFERENCE], f"/stats/prometheus differ:\n{prom[REFERENCE]}\n{prom[name]}"


LATE_LOCAL_REPLY = RequestSpec(path="/stats/late", headers=[("x-local-reply-phase", "response_body")],
                               expect={"outcome": "truncated"})


def test_admin_stats_count_the_reset_of_a_late_local_reply(filters_env: ConformanceEnvironment) -> None:
    """A local reply after the response started resets the stream: downstream_rq_rx_reset + 1."""
    def resets() -> dict[str, int]:
        out = {}
        for n, t in filters_env.targets.items():
            out[n] = _stat(t, "http.ingress_http.downstream_rq_rx_reset") or 0
        return out

    before = resets()
    filters_env.run(Case("late_local_reply", [LATE_LOCAL_REPLY]))
    after = resets()
    assert {n: after[n] - before[n] for n in after} == {n: 1 for n in after}


def test_admin_stats_list_zero_request_counters(filters_env: ConformanceEnvironment) -> None:
    """Scripts grep for counters that may still be 0: Envoy lists them from startup."""
    stats = {n: {k for k, v in _text_stats(t).items() if v == "0"} for n, t in filters_env.targets.items()}
    for name in stats:
        assert {"cluster.echo.upstream_rq_retry", "http.ingress_http.downstream_rq_http2_total"} <= stats[name], name


# --- the plugins' log lines ----------------------------------------------------------------------

# "[time][thread][level][wasm] [source:line] wasm log <plugin> <root_id> <vm_id>: <message>"; the
# source location is Envoy's alone.
_WASM_LOG = re.compile(r"^\[[^\]]*\]\[\d+\]\[(\w+)\]\[wasm\] (?:\[\S+\] )?wasm log (.*)$")
LOG_MARKER = "conformance-log-marker"
# The logging plugin writes levels 0-5, stdout and stderr (plugins/c/logging.c); both headers
# plugins log what their on_log phase read (plugins/c/headers.c).
LOG_HEADERS = [("x-log-message", LOG_MARKER), ("x-probe", LOG_MARKER),
               ("x-headers-ops", "log get request_headers x-probe")]
LOG_LINES_PER_REQUEST = 8 + 2


def _plugin_log(target: Target, marker: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in target.process.log_text().splitlines()
            if (m := _WASM_LOG.match(line)) and marker in m[2]]


def _wait_for_log(target: Target, marker: str, count: int) -> list[tuple[str, str]]:
    """The log is written by another process: re-read it (bounded) until `count` lines arrived."""
    with target.connect() as conn:
        for _ in range(200):
            lines = _plugin_log(target, marker)
            if len(lines) >= count:
                return lines
            conn.request("GET", "/log/poll")  # a round trip paces the re-read
    raise AssertionError(f"{target.name}: {count} log lines with {marker!r} not written: {lines}")


def test_plugin_log_lines_match(filters_env: ConformanceEnvironment) -> None:
    """Same level and text for every line the logging plugin writes, configure lines included."""
    for target in filters_env.targets.values():
        with target.connect() as conn:
            assert conn.request("GET", "/log", LOG_HEADERS).status == 200
    logs = {n: _wait_for_log(t, LOG_MARKER, LOG_LINES_PER_REQUEST) for n, t in filters_env.targets.items()}
    configured = {n: sorted(set(_plugin_log(t, "configured: conformance-logging")))
                  for n, t in filters_env.targets.items()}
    for name in logs:
        assert ("critical", f"logging logging: logging: level 5: {LOG_MARKER}") in logs[name], logs[name]
        assert ("info", f"headers headers_root headers: headers: x-get-x-probe: 0:{LOG_MARKER}") in logs[name], logs[name]
        assert configured[name] == [("info", "logging: logging: configured: conformance-logging")], configured[name]
    if REFERENCE in logs:
        for name in logs:
            assert logs[name] == logs[REFERENCE], f"{name} log lines differ from Envoy's"


# --- plugins that cannot start -----------------------------------------------------------------

STARTUP_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "vm_start_fails": ({"name": "fails_vm_start", "plugin": "trap", "vm_configuration": "fail_vm_start"},
                       "Failed to start base Wasm"),
    "configure_fails_even_fail_open": ({"name": "fails_configure", "plugin": "trap", "configuration": "fail_configure",
                                        "failure_policy": "FAIL_OPEN"}, "Failed to configure base Wasm plugin"),
    "no_abi_version": ({"name": "no_abi", "plugin": "wat_no_abi"}, "Missing or unknown Proxy-Wasm ABI version"),
    "corrupt_module": ({"name": "corrupt", "plugin": "corrupt_garbage"}, "Failed to parse corrupted Wasm module"),
}


def _wasm_filter(name: str, plugin: str, configuration: str | None = None, vm_configuration: str | None = None,
                 failure_policy: str | None = None) -> dict[str, Any]:
    def string_value(v: str) -> dict[str, str]:
        return {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": v}

    vm: dict[str, Any] = {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": f"{REPO}/plugins/out/{plugin}.wasm"}}}
    if vm_configuration is not None:
        vm["configuration"] = string_value(vm_configuration)
    config: dict[str, Any] = {"name": name, "vm_config": vm}
    if configuration is not None:
        config["configuration"] = string_value(configuration)
    if failure_policy:
        config["failure_policy"] = failure_policy
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config}}


def _standalone(target: str, filters: list[dict[str, Any]], path: Path, echo_port: int) -> tuple[ProxyProcess, int]:
    """A proxy (not yet started) with one listener running `filters` to cluster echo; its port."""
    listener, admin = free_ports(2)
    doc = bootstrap(listener_port=listener, admin_port=admin, clusters={"echo": echo_port},
                    virtual_hosts=[{"name": "all", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}],
                    http_filters=filters)
    return PROCESS_CLASSES[target](write_yaml(doc, path)), listener


@pytest.fixture(scope="module")
def startup_failures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, tuple[int, str]]]]:
    """Start Envoy and wasmproxy on every failing config at once; collect exit codes and logs."""
    from plugins.build import build

    build(list(PLUGINS))
    workdir = tmp_path_factory.mktemp("startup_failures")
    procs: dict[str, dict[str, ProxyProcess]] = {}
    try:
        for case, (spec, _) in STARTUP_FAILURES.items():
            for target in selected_targets():
                proc, _ = _standalone(target, [_wasm_filter(**spec)], workdir / f"{case}.{target}.yaml", free_port())
                proc.spawn()
                procs.setdefault(case, {})[target] = proc
        yield {case: {t: (_exit_code(p), p.log_text()) for t, p in by_target.items()}
               for case, by_target in procs.items()}
    finally:
        for by_target in procs.values():
            for p in by_target.values():
                p.stop()


def _exit_code(proc: ProxyProcess) -> int:
    assert proc.proc is not None
    try:
        return proc.proc.wait(timeout=EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} still running with a plugin that cannot start") from None


@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_plugin_that_cannot_start_fails_startup(startup_failures: dict[str, dict[str, tuple[int, str]]],
                                               case: str) -> None:
    spec, reason = STARTUP_FAILURES[case]
    seen = startup_failures[case]
    for target, (code, log) in seen.items():
        assert code == 1, f"{target} exited with {code}"
        assert reason in log, f"{target} did not log {reason!r}"
        assert f"Unable to create Wasm plugin {spec['name']}" in log, target
    assert len({code for code, _ in seen.values()}) == 1


# --- a divergence kept on purpose: FAIL_RELOAD with a 1 ms backoff ------------------------------

def test_fail_reload_with_a_1ms_backoff(tmp_path: Path, echo_upstream: int) -> None:
    """Envoy 1.40 dies of SIGFPE on the first reload with a 1 ms base_interval; wasmproxy reloads
    (docs/compatibility.md). Both answer the trapping request itself with 503."""
    from plugins.build import build

    build(["trap"])
    wasm = _wasm_filter("reload_1ms", "trap", failure_policy="FAIL_RELOAD")
    wasm["typed_config"]["config"]["reload_config"] = {"backoff": {"base_interval": "0.001s",
                                                                   "max_interval": "0.002s"}}
    for target in selected_targets():
        proc, port = _standalone(target, [wasm], tmp_path / f"{target}.yaml", echo_upstream)
        with proc:
            with RawConnection(LOOPBACK, port) as conn:
                assert conn.request("GET", "/", [("x-trap-phase", "request_headers")]).status == 503
            if proc.name == "envoy":
                with RawConnection(LOOPBACK, port) as conn, pytest.raises(PeerClosed):
                    conn.request("GET", "/")
                assert _exit_code(proc) == -signal.SIGFPE
            else:
                with RawConnection(LOOPBACK, port) as conn:
                    r = conn.request("GET", "/")
                assert (r.status, r.header("x-trap-requests")) == (200, "1")  # a fresh VM
