"""PluginConfig: failure policies, FAIL_RELOAD with backoff, start-up failures, environment
variables, remote code. Driven socket-free with the trap plugin (expectations pinned against
Envoy 1.40 in tests/envoy_plugins/test_envoy_failures.py)."""

from __future__ import annotations

import hashlib
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.wasm_filter_support import (
    FakeDispatcher,
    Stream,
    factory_context,
    http_wasm,
    plugin_config,
    plugin_path,
)
from wasmproxy.config.errors import ConfigError
from wasmproxy.log import get_logger
from wasmproxy.wasm import code as code_module
from wasmproxy.wasm.http_filter import create_wasm_filter_factory
from wasmproxy.wasm.plugin import PluginConfig, any_to_bytes

POLICIES = ["FAIL_CLOSED", "FAIL_OPEN", "FAIL_RELOAD"]


class LogText(logging.Handler):
    """The wasm logger's messages (wasmproxy's loggers do not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def wasm_log() -> Iterator[LogText]:
    handler = LogText()
    logger = get_logger("wasm")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _factory(dispatcher: FakeDispatcher, **kwargs: Any):  # type: ignore[no-untyped-def]
    context = factory_context(dispatcher)
    kwargs.setdefault("vm_id", f"trap-{id(dispatcher)}")
    return create_wasm_filter_factory(http_wasm(plugin_config("trap", **kwargs)), context), context


def _run(factory: Any, phase: str | None = None) -> Stream:
    s = Stream([factory])
    s.request([("x-trap-phase", phase)] if phase else [], [b"x"])
    if not s.downstream.ended:
        s.respond(200, [("content-length", "5")], [b"hel", b"lo"])
    s.finish()
    return s


def _alive(s: Stream) -> bool:
    return s.downstream.headers is not None and s.downstream.headers.get("x-trap-plugin") == "alive"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("phase", ["request_headers", "request_body", "response_headers"])
def test_trap_before_the_response_starts_gives_503(phase: str, policy: str, wasm_log: LogText) -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, failure_policy=policy)
    first = _run(factory, phase)
    assert (first.downstream.status, bytes(first.downstream.body)) == (503, b"")
    assert first.stream_info.response_code_details == "wasm_fail_stream"
    assert f"Function: proxy_on_{phase} failed: Uncaught RuntimeError: unreachable" in wasm_log.text
    after = _run(factory)
    if policy == "FAIL_OPEN":  # the dead VM is skipped: requests pass through unfiltered
        assert after.downstream.status == 200 and not _alive(after)
        assert after.upstream.complete
    else:  # FAIL_CLOSED, and FAIL_RELOAD within its backoff
        assert after.downstream.status == 503 and after.upstream.headers is None


@pytest.mark.parametrize("policy", POLICIES)
def test_trap_in_response_body_resets_the_started_response(policy: str) -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, failure_policy=policy)
    first = _run(factory, "response_body")
    assert first.downstream.status == 200 and _alive(first)
    assert first.downstream.reset
    _check_after_late_trap(dispatcher, factory, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_trap_in_on_log_spares_the_response_but_not_the_vm(policy: str) -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, failure_policy=policy)
    first = _run(factory, "log")
    assert first.downstream.status == 200 and _alive(first) and not first.downstream.reset
    _check_after_late_trap(dispatcher, factory, policy)


def _check_after_late_trap(dispatcher: FakeDispatcher, factory: Any, policy: str) -> None:
    dispatcher.time_source.advance(2.0)  # past any reload backoff (1 s base, 1.5 s jittered)
    after = _run(factory)
    if policy == "FAIL_CLOSED":
        assert after.downstream.status == 503
    elif policy == "FAIL_OPEN":
        assert after.downstream.status == 200 and not _alive(after)
    else:  # FAIL_RELOAD: a fresh VM (its request counter starts again)
        assert after.downstream.status == 200 and _alive(after)
        assert after.downstream.headers is not None and after.downstream.headers.get("x-trap-requests") == "1"
        again = _run(factory)
        assert again.downstream.headers is not None and again.downstream.headers.get("x-trap-requests") == "2"


def test_fail_reload_waits_for_the_backoff_and_counts() -> None:
    dispatcher = FakeDispatcher()
    factory, context = _factory(dispatcher, failure_policy="FAIL_RELOAD", name="reloader", reload_base_ms=100)
    store = context.main_store
    _run(factory, "request_headers")
    assert _run(factory).downstream.status == 503  # within 100..150 ms of the load
    assert store.counter("wasm.reloader.vm_reload_backoff").value == 1
    dispatcher.time_source.advance(0.2)
    assert _run(factory).downstream.status == 200
    assert store.counter("wasm.reloader.vm_reload_success").value == 1
    assert store.counter("wasm.reloader.vm_reload_failure").value == 0


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_OPEN"])
def test_trap_in_on_tick_kills_the_vm(policy: str, wasm_log: LogText) -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, failure_policy=policy, configuration="tick 10\ntrap tick")
    timers = dispatcher.armed_timers()
    assert [t.armed_ms for t in timers] == [10]  # the main thread's clone; the canary never ticks
    timers[0].fire()
    assert "Function: proxy_on_tick failed: Uncaught RuntimeError: unreachable" in wasm_log.text
    after = _run(factory)
    if policy == "FAIL_CLOSED":
        assert after.downstream.status == 503
    else:
        assert after.downstream.status == 200 and not _alive(after)


def test_legacy_fail_open_lets_the_trapping_stream_continue() -> None:
    """Envoy 1.40: with the deprecated bool, a trap in a callback does not fail the stream."""
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, fail_open=True)
    first = _run(factory, "request_headers")
    assert first.downstream.status == 200 and first.upstream.complete
    assert _run(factory).downstream.status == 200
    late = _run(_factory(FakeDispatcher(), fail_open=True)[0], "response_body")
    assert bytes(late.downstream.body) == b"hello" and not late.downstream.reset


def test_fail_open_and_failure_policy_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="only one of fail_open or failure_policy can be set"):
        _factory(FakeDispatcher(), fail_open=True, failure_policy="FAIL_CLOSED")


STARTUP_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "fail_vm_start": ({"plugin": "trap", "vm_configuration": "fail_vm_start"}, "Failed to start base Wasm"),
    "trap_vm_start": ({"plugin": "trap", "vm_configuration": "trap_vm_start"},
                      "Function: proxy_on_vm_start failed: Uncaught RuntimeError: unreachable"),
    "fail_configure": ({"plugin": "trap", "configuration": "fail_configure"}, "Failed to configure base Wasm plugin"),
    "fail_configure_open": ({"plugin": "trap", "configuration": "fail_configure", "failure_policy": "FAIL_OPEN"},
                            "Failed to configure base Wasm plugin"),
    "trap_configure": ({"plugin": "trap", "configuration": "trap_configure"},
                       "Function: proxy_on_configure failed: Uncaught RuntimeError: unreachable"),
    "no_abi": ({"plugin": "wat_no_abi"}, "Missing or unknown Proxy-Wasm ABI version"),
    "unknown_import": ({"plugin": "wat_unknown_import"},
                       "Failed to load Wasm module due to a missing import: env.proxy_does_not_exist"),
    "corrupt_truncated": ({"plugin": "corrupt_truncated"}, "Failed to parse corrupted Wasm module"),
    "corrupt_garbage": ({"plugin": "corrupt_garbage", "failure_policy": "FAIL_OPEN"},
                        "Failed to parse corrupted Wasm module"),
}


@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_plugin_that_cannot_start_rejects_the_config(case: str, wasm_log: LogText) -> None:
    """Every policy, FAIL_OPEN included (as Envoy: a static listener's plugin must load)."""
    kwargs, reason = STARTUP_FAILURES[case]
    kwargs = dict(kwargs)
    name = kwargs.pop("plugin")
    with pytest.raises(ConfigError, match=f"^Unable to create Wasm plugin {name}$"):
        create_wasm_filter_factory(http_wasm(plugin_config(name, vm_id=case, **kwargs)), factory_context())
    assert reason in wasm_log.text
    assert f"Plugin {name} failed to load" in wasm_log.text


def test_missing_code_file_is_a_config_error(tmp_path: Path) -> None:
    proto = plugin_config("trap")
    proto.vm_config.code.local.filename = str(tmp_path / "nope.wasm")
    with pytest.raises(ConfigError, match=f"^Invalid path: {tmp_path / 'nope.wasm'}$"):
        PluginConfig(proto, factory_context())


def test_inline_code_runs_like_a_file() -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, inline=True)
    assert _alive(_run(factory))


def test_unsupported_runtime_is_rejected() -> None:
    proto = plugin_config("trap")
    proto.vm_config.runtime = "envoy.wasm.runtime.null"
    with pytest.raises(ConfigError, match="envoy.wasm.runtime.null"):
        PluginConfig(proto, factory_context())


def test_any_to_bytes_unwraps_string_and_bytes_values_only() -> None:
    from google.protobuf import any_pb2, wrappers_pb2

    for msg, expected in [(wrappers_pb2.StringValue(value="text"), b"text"),
                          (wrappers_pb2.BytesValue(value=b"\x00\x01"), b"\x00\x01"),
                          (wrappers_pb2.UInt32Value(value=5), b"\x08\x05")]:  # serialized, as Envoy 1.40
        packed = any_pb2.Any()
        packed.Pack(msg)
        assert any_to_bytes(packed) == expected


# -- environment variables ---------------------------------------------------------------------


def test_environment_variables_merge_key_values_and_host_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMPROXY_TEST_HOST_KEY", "from-host")
    proto = plugin_config("trap", env={"A": "1"}, host_env_keys=("WASMPROXY_TEST_HOST_KEY", "WASMPROXY_UNSET_KEY"))
    config = PluginConfig(proto, factory_context())
    wasm = config.wasm()
    assert wasm is not None
    assert wasm.envs == {"A": "1", "WASMPROXY_TEST_HOST_KEY": "from-host"}


ENVIRON_WAT = """
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param i32) (result i32) (local i32)
    global.get $heap local.set 1
    global.get $heap local.get 0 i32.add global.set $heap
    local.get 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  ;; Logs the whole environ block (NUL-separated KEY=VALUE strings) at info.
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $get (i32.const 16) (i32.const 1024)))
    (drop (call $log (i32.const 2) (i32.const 1024) (i32.load (i32.const 4))))
    (i32.const 1)))
"""


def test_plugin_sees_environment_variables_through_wasi_environ(monkeypatch: pytest.MonkeyPatch,
                                                                 wasm_log: LogText) -> None:
    import wasmtime

    monkeypatch.setenv("WASMPROXY_TEST_HOST_KEY", "host-value")
    proto = plugin_config("trap", env={"A": "1"}, host_env_keys=("WASMPROXY_TEST_HOST_KEY",), name="environ",
                          vm_id="environ")
    proto.vm_config.code.local.inline_bytes = bytes(wasmtime.wat2wasm(ENVIRON_WAT))
    PluginConfig(proto, factory_context())
    logged = [line for line in wasm_log.lines if "A=1" in line]
    assert logged, wasm_log.text
    assert logged[0].endswith("A=1\0WASMPROXY_TEST_HOST_KEY=host-value\0")


def test_duplicate_environment_keys_are_rejected() -> None:
    proto = plugin_config("trap", env={"A": "1"}, host_env_keys=("A",), name="dup")
    with pytest.raises(ConfigError, match="Key A is duplicated in envoy.extensions.wasm.v3.VmConfig."
                                          "environment_variables for dup. All the keys must be unique."):
        PluginConfig(proto, factory_context())


# -- remote code ---------------------------------------------------------------------------


class _CodeServer:
    """A loopback HTTP server serving one body (counting requests) for remote-code tests."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def trap_code() -> bytes:
    return Path(plugin_path("trap")).read_bytes()


@pytest.fixture
def code_server(trap_code: bytes) -> Iterator[_CodeServer]:
    code_module.clear_code_cache_for_testing()
    server = _CodeServer(trap_code)
    yield server
    server.stop()
    code_module.clear_code_cache_for_testing()


def _remote_proto(port: int, sha256: str, retries: int = 0) -> Any:
    proto = plugin_config("trap", name="remote", vm_id=f"remote-{sha256[:8]}")
    proto.vm_config.code.ClearField("local")
    remote = proto.vm_config.code.remote
    remote.http_uri.uri = f"http://code.test:{port}/trap.wasm"
    remote.http_uri.cluster = "code"
    remote.http_uri.timeout.FromMilliseconds(2000)
    remote.sha256 = sha256
    remote.retry_policy.num_retries.value = retries
    remote.retry_policy.retry_back_off.base_interval.FromMilliseconds(1)
    return proto


def _remote_context(port: int) -> Any:
    """A FactoryContext whose bootstrap has the STRICT_DNS cluster "code" at localhost:<port>."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    context = factory_context()
    bootstrap = bootstrap_pb2.Bootstrap()
    cluster = bootstrap.static_resources.clusters.add(name="code", type=1)  # STRICT_DNS
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    endpoint.address.socket_address.address = "localhost"
    endpoint.address.socket_address.port_value = port
    context.bootstrap = bootstrap
    return context


def test_remote_code_is_fetched_checked_and_cached(code_server: _CodeServer, trap_code: bytes) -> None:
    sha = hashlib.sha256(trap_code).hexdigest()
    context = _remote_context(code_server.port)
    config = PluginConfig(_remote_proto(code_server.port, sha), context)
    assert config.wasm() is not None and not config.wasm().is_failed()  # type: ignore[union-attr]
    PluginConfig(_remote_proto(code_server.port, sha), context)
    assert code_server.hits == 1
    store = context.main_store
    assert store.counter("wasm.remote_load_cache_misses").value == 1
    assert store.counter("wasm.remote_load_fetch_successes").value == 1
    assert store.counter("wasm.remote_load_cache_hits").value == 1


def test_remote_code_with_the_wrong_sha256_loads_no_vm(code_server: _CodeServer,
                                                       wasm_log: LogText) -> None:
    context = _remote_context(code_server.port)
    config = PluginConfig(_remote_proto(code_server.port, "00" * 32, retries=2), context)
    assert code_server.hits == 3  # the first try and two retries
    assert config.base is None
    assert "Plugin remote failed to load" in wasm_log.text
    assert "Wasm remote code fetch is unstable and may cause a crash" in wasm_log.text
    assert context.main_store.counter("wasm.remote_load_fetch_failures").value == 1
    s = Stream([create_wasm_filter_factory(http_wasm(_remote_proto(code_server.port, "00" * 32)), context)])
    s.request([])
    assert s.downstream.status == 503  # fail closed: no VM (the failure is cached for 10 s)
    assert code_server.hits == 3
    assert context.main_store.counter("wasm.remote_load_cache_negative_hits").value == 1


def test_allow_precompiled_keeps_compiled_code_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       trap_code: bytes) -> None:
    monkeypatch.setenv("WASMPROXY_CODE_CACHE", str(tmp_path))
    # A custom section makes the code unique, so it is compiled now rather than found in memory.
    payload = b"\x04test" + str(tmp_path).encode()
    code = trap_code + b"\x00" + bytes([len(payload)]) + payload
    assert code_module.compile_code(code, "trap", allow_precompiled=False) is not None
    assert list(tmp_path.iterdir()) == []
    other = code + b"\x00\x02\x01y"
    assert code_module.compile_code(other, "trap", allow_precompiled=True) is not None
    assert [p.suffix for p in tmp_path.iterdir()] == [".cwasm"]


def test_nack_on_code_cache_miss_rejects_uncached_remote_code(code_server: _CodeServer, trap_code: bytes) -> None:
    """Envoy 1.40 exits with "Unable to create Wasm plugin" before fetching anything."""
    sha = hashlib.sha256(trap_code).hexdigest()
    context = _remote_context(code_server.port)
    proto = _remote_proto(code_server.port, sha)
    proto.vm_config.nack_on_code_cache_miss = True
    with pytest.raises(ConfigError, match="^Unable to create Wasm plugin remote$"):
        PluginConfig(proto, context)
    assert code_server.hits == 0
    PluginConfig(_remote_proto(code_server.port, sha), context)  # fills the cache
    assert PluginConfig(proto, context).wasm() is not None  # now cached: accepted
    assert code_server.hits == 1
