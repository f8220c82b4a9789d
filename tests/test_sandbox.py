"""Sandbox limits, socket-free: per-callback CPU deadline, per-VM memory cap, capabilities.

The plugins run through the real filter factory and FilterManager (tests/wasm_filter_support)
with fake dispatchers; the deadline is real wall time (wasmtime's epoch ticker thread), so the
assertions on elapsed time are generous upper bounds, never waits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import wasmtime

from tests.wasm_filter_support import FakeDispatcher, Stream, factory_context, http_wasm, plugin_config
from tests.wasm_host.guest import SCRATCH, Guest
from wasmproxy.cli import parse_options
from wasmproxy.log import get_logger
from wasmproxy.wasm.abi import FailState, WasmResult
from wasmproxy.wasm.context import Plugin
from wasmproxy.wasm.http_filter import create_wasm_filter_factory
from wasmproxy.wasm.runtime import MAX_WASM_MEMORY_SIZE_BYTES, compile_module
from wasmproxy.wasm.sandbox import (
    DEFAULT_CALLBACK_DEADLINE_MS,
    EPOCH_TICK_MS,
    FACTORY_CONTEXT_KEY,
    STARTUP_DEADLINE_MS,
    SandboxLimits,
    limits_for,
)
from wasmproxy.wasm.stats import CONTEXTS_ACTIVE
from wasmproxy.wasm.wasm import Wasm

DEADLINE_MS = 30
# Far above the deadline (a loaded CI machine), far below "hung".
HUNG_S = 5.0


def _factory(dispatcher: FakeDispatcher, plugin: str, *args: Any, limits: SandboxLimits | None = None,
             **kwargs: Any) -> tuple[Any, Any]:
    context = factory_context(dispatcher)
    context.extras = {FACTORY_CONTEXT_KEY: limits or SandboxLimits(callback_deadline_ms=DEADLINE_MS)}
    return create_wasm_filter_factory(http_wasm(plugin_config(plugin, *args, **kwargs)), context), context


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def wasm_log() -> Any:
    records = _Records()
    get_logger("wasm").addHandler(records)
    yield records
    get_logger("wasm").removeHandler(records)


# -- limits and flags ---------------------------------------------------------------------------


def test_deadline_ticks_cover_at_least_the_deadline_and_zero_disables() -> None:
    assert SandboxLimits(0).epoch_deadline_ticks is None
    for ms in (1, 10, 15, 100):
        ticks = SandboxLimits(ms).epoch_deadline_ticks
        assert ticks is not None and (ticks - 1) * EPOCH_TICK_MS >= ms > (ticks - 2) * EPOCH_TICK_MS
    assert SandboxLimits().callback_deadline_ms == DEFAULT_CALLBACK_DEADLINE_MS == 100
    assert SandboxLimits().memory_limit_bytes == MAX_WASM_MEMORY_SIZE_BYTES == 1 << 30


def test_cli_flags_reach_the_options_and_the_context() -> None:
    opts = parse_options(["-c", "x.yaml", "--wasm-callback-deadline-ms", "0", "--wasm-memory-limit-mb", "64"])
    assert not isinstance(opts, int)
    assert (opts.wasm_callback_deadline_ms, opts.wasm_memory_limit_mb) == (0, 64)
    defaults = parse_options(["-c", "x.yaml"])
    assert not isinstance(defaults, int)
    assert (defaults.wasm_callback_deadline_ms, defaults.wasm_memory_limit_mb) == (100, 1024)
    with pytest.raises(SystemExit):
        parse_options(["--wasm-callback-deadline-ms", "-1"])
    context = factory_context()
    assert limits_for(context) == SandboxLimits()
    context.extras = {FACTORY_CONTEXT_KEY: SandboxLimits(5, 1 << 20)}
    assert limits_for(context) == SandboxLimits(5, 1 << 20)


# -- CPU deadline -------------------------------------------------------------------------------


def test_infinite_loop_fails_only_its_request_and_the_thread_keeps_serving(wasm_log: _Records) -> None:
    dispatcher = FakeDispatcher()
    looping, _ = _factory(dispatcher, "wat_infinite_loop", name="looping")
    healthy, _ = _factory(dispatcher, "headers", "response_headers add response_headers x-ok 1", name="healthy")

    started = time.monotonic()
    s = Stream([looping])
    s.request([])
    elapsed = time.monotonic() - started
    assert s.downstream.status == 503 and not s.upstream.complete
    assert DEADLINE_MS / 1000 <= elapsed < HUNG_S
    assert any("Function: proxy_on_request_headers failed: Uncaught RuntimeError: interrupted" in line
               for line in wasm_log.lines), wasm_log.lines
    s.finish()

    # The same thread serves the next request of another plugin at once.
    ok = Stream([healthy])
    ok.request([])
    ok.respond(200)
    assert ok.downstream.status == 200 and ok.downstream.headers is not None
    assert ok.downstream.headers.get("x-ok") == "1"
    ok.finish()

    # FAIL_CLOSED: the looping plugin's VM stays failed; later requests get 503 without running it.
    interrupts = sum("interrupted" in line for line in wasm_log.lines)
    again = Stream([looping])
    again.request([])
    assert again.downstream.status == 503
    assert sum("interrupted" in line for line in wasm_log.lines) == interrupts
    again.finish()


def test_fail_reload_recreates_the_vm_after_an_interrupt() -> None:
    dispatcher = FakeDispatcher()
    factory, context = _factory(dispatcher, "wat_infinite_loop", name="reloading", failure_policy="FAIL_RELOAD",
                                reload_base_ms=10)
    store = context.main_store
    created = store.counter("wasm.envoy.wasm.runtime.v8.created").value
    first = Stream([factory])
    first.request([])
    assert first.downstream.status == 503
    first.finish()
    dispatcher.time_source.advance(1.0)
    second = Stream([factory])
    second.request([])
    assert second.downstream.status == 503  # the new VM loops too, and is interrupted too
    second.finish()
    assert store.counter("wasm.reloading.vm_reload_success").value == 1
    assert store.counter("wasm.envoy.wasm.runtime.v8.created").value == created + 1


def test_legacy_fail_open_lets_the_interrupted_request_through() -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, "wat_infinite_loop", name="open", fail_open=True)
    s = Stream([factory])
    s.request([])
    assert s.upstream.complete and s.downstream.headers is None
    s.respond(200)
    assert s.downstream.status == 200
    s.finish()


def test_deadline_zero_gives_the_vm_no_deadline() -> None:
    # (The runtime's own tests show a VM without deadline ticks is never interrupted.)
    g = Guest(limits=SandboxLimits(0))
    assert g.wasm.vm is not None and g.wasm.vm._deadline_ticks is None
    g2 = Guest(limits=SandboxLimits(DEADLINE_MS))
    assert g2.wasm.vm is not None and g2.wasm.vm._deadline_ticks == SandboxLimits(DEADLINE_MS).epoch_deadline_ticks


# -- memory cap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit_mb, pages", [(16, 256), (64, 1024)])
def test_unbounded_memory_growth_stops_at_the_cap(limit_mb: int, pages: int) -> None:
    dispatcher = FakeDispatcher()
    factory, _ = _factory(dispatcher, "wat_memory_grow", limits=SandboxLimits(DEADLINE_MS * 10, limit_mb << 20))
    s = Stream([factory])
    s.request([])
    assert s.upstream.complete  # memory.grow returned -1 to the guest; the host is fine
    s.respond(200)
    assert s.downstream.status == 200 and s.downstream.headers is not None
    assert s.downstream.headers.get("x-memory-pages") == str(pages)
    s.finish()


def test_initial_memory_over_the_cap_is_a_load_error() -> None:
    wat = """(module (memory (export "memory") 300)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 0)))"""
    wasm = Wasm(compile_module(wasmtime.wat2wasm(wat), name="big"), post=lambda cb: None,
                limits=SandboxLimits(memory_limit_bytes=16 << 20))
    assert not wasm.initialize()
    assert wasm.fail_state == FailState.UnableToInitializeCode


# -- capability restriction (cpp-host registerCallbacks / getFunctions) -------------------------

_BASE_CAPS = {"proxy_on_context_create", "proxy_on_vm_start", "proxy_on_configure"}


def test_unlisted_proxy_host_function_is_a_stub_returning_internal_failure(wasm_log: _Records) -> None:
    g = Guest(allowed_capabilities=frozenset(_BASE_CAPS | {"proxy_log"}))
    p, n = g.put(b"hello")
    assert g.call(None, "proxy_log", 2, p, n) == WasmResult.Ok
    assert g.call(None, "proxy_get_current_time_nanoseconds", SCRATCH) == WasmResult.InternalFailure
    assert g.call(None, "proxy_set_shared_data", p, n, p, n, 0) == WasmResult.InternalFailure
    assert "Attempted call to restricted proxy-wasm capability: proxy_get_current_time_nanoseconds" in wasm_log.lines
    assert "Attempted call to restricted proxy-wasm capability: proxy_set_shared_data" in wasm_log.lines
    assert not g.wasm.is_failed()


def test_empty_allowed_capabilities_allow_everything() -> None:
    g = Guest(allowed_capabilities=frozenset())
    assert g.call(None, "proxy_get_current_time_nanoseconds", SCRATCH) == WasmResult.Ok


def test_unlisted_callback_is_never_called() -> None:
    g = Guest(allowed_capabilities=frozenset(_BASE_CAPS | {"proxy_on_response_headers"}))
    assert "proxy_on_request_headers" not in g.wasm.module_functions
    assert "proxy_on_response_headers" in g.wasm.module_functions
    assert g.root is not None
    ctx = g.wasm.create_stream_context(g.plugin)
    ctx.on_create()
    ctx.on_request_headers(0, True)
    ctx.on_response_headers(0, True)
    assert "proxy_on_request_headers" not in g.names() and "proxy_on_response_headers" in g.names()


def test_start_and_configure_not_allowed_means_neither_runs() -> None:
    g = Guest(allowed_capabilities=frozenset({"proxy_log"}), start=False)
    assert g.wasm.initialize()
    root = g.wasm.start(g.plugin)
    # No proxy_on_vm_start / proxy_on_configure to call: cpp-host treats both as "yes".
    assert root is not None and g.wasm.configure(root, g.plugin)
    assert g.names() == []


_WASI_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hi\\n")
  (data (i32.const 16) "\\40\\00\\00\\00\\03\\00\\00\\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "t_fd_write") (result i32) (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))
  (func (export "t_clock") (result i32) (call $clock (i32.const 0) (i64.const 1) (i32.const 40)))
  (func (export "t_exit") (call $exit (i32.const 3))))"""


@pytest.mark.parametrize("allowed, fd_write, clock", [
    (frozenset(), 0, 0),
    (frozenset({"fd_write"}), 0, 76),
    (frozenset({"clock_time_get"}), 76, 0),
])
def test_unlisted_wasi_function_returns_enotcapable(wasm_log: _Records, allowed: frozenset[str], fd_write: int,
                                                     clock: int) -> None:
    wasm = Wasm(compile_module(wasmtime.wat2wasm(_WASI_WAT), name="wasi-caps"), post=lambda cb: None,
                allowed_capabilities=allowed)
    assert wasm.initialize(), wasm.fail_message
    assert wasm.start(Plugin(name="p", root_id="")) is not None
    vm = wasm.vm
    assert vm is not None
    assert [vm.get_function(name)() for name in ("t_fd_write", "t_clock")] == [fd_write, clock]  # type: ignore[misc]
    vm.get_function("t_exit")()  # type: ignore[misc]
    restricted = [line for line in wasm_log.lines if line.startswith("Attempted call to restricted WASI")]
    if allowed:
        assert "Attempted call to restricted WASI capability: proc_exit" in restricted
    else:
        assert restricted == []


# -- introspection: wasmproxy.wasm.contexts_active --------------------------------------------


def test_contexts_active_gauge_returns_to_its_baseline_after_streams_and_traps() -> None:
    dispatcher = FakeDispatcher()
    factory, context = _factory(dispatcher, "trap", name="counted")
    gauge = context.main_store.gauge(CONTEXTS_ACTIVE)
    baseline = gauge.value
    assert baseline >= 2  # the base VM and this thread's clone: a VM context and a root context each
    s = Stream([factory])
    s.request([])
    assert gauge.value == baseline + 1
    s.respond(200)
    s.finish()
    assert gauge.value == baseline
    trapped = Stream([factory])
    trapped.request([("x-trap-phase", "request_headers")])
    assert trapped.downstream.status == 503
    trapped.finish()
    assert gauge.value == baseline
    failed = Stream([factory])  # FAIL_CLOSED: a context with no VM is not counted
    failed.request([])
    failed.finish()
    assert gauge.value == baseline


def test_start_up_calls_get_the_longer_start_up_deadline() -> None:
    limits = SandboxLimits(DEADLINE_MS)
    g = Guest(limits=limits, start=False)
    seen: dict[str, Any] = {}

    def record(name: str) -> Any:
        def handler(*_: int) -> int:
            seen[name] = g.wasm.vm._deadline_ticks  # type: ignore[union-attr]
            return 1
        return handler

    g.handlers["proxy_on_vm_start"] = record("vm_start")
    g.handlers["proxy_on_configure"] = record("configure")
    g.handlers["proxy_on_request_headers"] = record("request_headers")
    assert g.wasm.initialize()
    root = g.wasm.start(g.plugin)
    assert root is not None and g.wasm.configure(root, g.plugin)
    ctx = g.wasm.create_stream_context(g.plugin)
    ctx.on_create()
    ctx.on_request_headers(0, True)
    assert limits.startup_deadline_ticks == STARTUP_DEADLINE_MS // EPOCH_TICK_MS + 1
    assert seen == {"vm_start": limits.startup_deadline_ticks, "configure": limits.startup_deadline_ticks,
                    "request_headers": limits.epoch_deadline_ticks}


def test_contexts_active_gauge_counts_a_tcp_connection_until_it_closes() -> None:
    from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2

    from tests.test_wasm_network_filter import FakeConnection, Terminal
    from wasmproxy.network.filter import ConnectionCloseType
    from wasmproxy.network.filter_manager import FilterManager
    from wasmproxy.wasm.network_filter import create_wasm_network_filter_factory

    context = factory_context()
    factory = create_wasm_network_filter_factory(
        network_wasm_pb2.Wasm(config=plugin_config("tcp_filter", "upper")), context)
    gauge = context.main_store.gauge(CONTEXTS_ACTIVE)
    baseline = gauge.value
    conn = FakeConnection()
    fm = FilterManager(conn)  # type: ignore[arg-type]
    factory(fm)
    fm.add_read_filter(Terminal())
    conn.read_buffer += b"hello"
    fm.on_read()
    assert gauge.value == baseline + 1
    conn.close(ConnectionCloseType.NoFlush)
    assert gauge.value == baseline
