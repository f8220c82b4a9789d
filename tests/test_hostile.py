"""Hostile plugins, table-driven: every abuse gets the spec's status or a clear load error, never
a Python exception escaping or a dead host.

Already covered elsewhere (not repeated here): status codes of each host call with bad pointers
and bad arguments in tests/test_hostcalls.py (e.g. test_log_levels_and_bad_pointer,
test_header_map_value_found_missing_and_errors, test_a_failing_host_call_answers_internal_failure_and_keeps_the_vm),
invalid/truncated modules, missing imports, traps, re-entrant guest calls, calls from another
thread and memory limits at the runtime level in tests/test_wasm_runtime.py, the ABI marker in
tests/test_wasm_abi.py, proc_exit and the other WASI stubs in tests/test_wasi.py, and random
pointers into every host function in tests/test_fuzz_hostcalls.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.wasm_filter_support import FakeDispatcher, Stream, factory_context, http_wasm, plugin_config
from tests.wasm_host.fakes import FakeStreamEnv, stream_info
from tests.wasm_host.guest import BAD_PTR, SCRATCH, Guest, guest_wat
from wasmproxy.config.errors import ConfigError
from wasmproxy.http.headers import HeaderMap
from wasmproxy.log import get_logger
from wasmproxy.wasm.abi import AbiVersion, WasmResult
from wasmproxy.wasm.http_filter import create_wasm_filter_factory
from wasmproxy.wasm.sandbox import FACTORY_CONTEXT_KEY, SandboxLimits

OK = WasmResult.Ok
BAD_ARG = WasmResult.BadArgument
INVALID = WasmResult.InvalidMemoryAccess
NOT_FOUND = WasmResult.NotFound
U32_MAX = 0xFFFF_FFFF  # a "negative" i32 length
HUGE = 0x7FFF_FFFF
P = SCRATCH  # a valid pointer to a few bytes ("x-a")
OUT = SCRATCH + 64  # valid out-parameters
OUT2 = SCRATCH + 68

# (host function, args, expected status) with the plugin inside a stream callback.
HOST_CALL_ABUSE = {
    "log_bad_pointer": ("proxy_log", (2, BAD_PTR, 4), INVALID),
    "log_negative_length": ("proxy_log", (2, P, U32_MAX), INVALID),
    "log_huge_length": ("proxy_log", (2, P, HUGE), INVALID),
    "log_pointer_plus_length_wraps": ("proxy_log", (2, U32_MAX, 2), INVALID),
    "log_bad_level": ("proxy_log", (99, P, 3), BAD_ARG),
    "header_value_bad_map_type": ("proxy_get_header_map_value", (99, P, 3, OUT, OUT2), BAD_ARG),
    "header_value_bad_key_pointer": ("proxy_get_header_map_value", (0, BAD_PTR, 3, OUT, OUT2), INVALID),
    "header_value_bad_out_pointer": ("proxy_get_header_map_value", (0, P, 3, BAD_PTR, BAD_PTR), INVALID),
    "add_header_bad_map_type": ("proxy_add_header_map_value", (U32_MAX, P, 3, P, 3), BAD_ARG),
    "add_header_negative_value_length": ("proxy_add_header_map_value", (0, P, 3, P, U32_MAX), INVALID),
    "pairs_bad_map_type": ("proxy_get_header_map_pairs", (8, OUT, OUT2), BAD_ARG),
    "set_pairs_garbage": ("proxy_set_header_map_pairs", (0, P, 3), OK),
    "map_size_bad_out": ("proxy_get_header_map_size", (0, BAD_PTR), INVALID),
    "buffer_bad_type": ("proxy_get_buffer_bytes", (99, 0, 10, OUT, OUT2), BAD_ARG),
    "buffer_status_bad_type": ("proxy_get_buffer_status", (99, OUT, OUT2), BAD_ARG),
    "continue_bad_stream_type": ("proxy_continue_stream", (99,), BAD_ARG),
    "close_bad_stream_type": ("proxy_close_stream", (99,), BAD_ARG),
    "effective_context_unknown_id": ("proxy_set_effective_context", (123456,), BAD_ARG),
    "property_negative_length": ("proxy_get_property", (P, U32_MAX, OUT, OUT2), INVALID),
    "shared_data_bad_key": ("proxy_get_shared_data", (BAD_PTR, 4, OUT, OUT2, OUT2 + 4), INVALID),
    "queue_bad_name": ("proxy_register_shared_queue", (BAD_PTR, 8, OUT), INVALID),
    "metric_bad_type": ("proxy_define_metric", (9, P, 3, OUT), BAD_ARG),
    "metric_unknown_id": ("proxy_increment_metric", (12345, 1), NOT_FOUND),
    "foreign_function_unknown": ("proxy_call_foreign_function", (P, 3, P, 0, OUT, OUT2), NOT_FOUND),
    "local_response_bad_body": ("proxy_send_local_response", (500, P, 3, BAD_PTR, 4, P, 0, -1 & U32_MAX), INVALID),
    "http_call_bad_upstream": ("proxy_http_call", (BAD_PTR, 4, P, 0, P, 0, P, 0, 1000, OUT), INVALID),
    "time_bad_out": ("proxy_get_current_time_nanoseconds", (BAD_PTR,), INVALID),
}


@pytest.mark.parametrize("case", list(HOST_CALL_ABUSE))
def test_host_call_abuse_gets_the_specs_status_and_the_vm_lives(case: str) -> None:
    name, args, expected = HOST_CALL_ABUSE[case]
    g = Guest()
    g.put(b"x-a")
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.on_create()
    ctx.request_headers = HeaderMap([("x-a", "1")])
    got: list[int] = []
    g.handlers["proxy_on_request_headers"] = lambda *a: got.append(g.hostcall(name, *args))
    ctx.on_request_headers(0, True)
    assert got == [expected], (case, got)
    assert not g.wasm.is_failed()
    # The VM still serves host calls afterwards.
    assert g.call(ctx, "proxy_log", 2, P, 3) == OK


def test_ten_thousand_host_calls_in_one_callback() -> None:
    loop = """
  (func (export "t_many") (param $n i32) (result i32) (local $bad i32)
    (loop $again
      (if (call $proxy_get_current_time_nanoseconds (i32.const 1100))
        (then (local.set $bad (i32.add (local.get $bad) (i32.const 1)))))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
    (local.get $bad))"""
    g = Guest(wat=guest_wat(AbiVersion.ProxyWasm_0_2_1, extra=loop), limits=SandboxLimits(callback_deadline_ms=0))
    vm = g.wasm.vm
    assert vm is not None
    many = vm.get_function("t_many")
    assert many is not None
    assert g.wasm.call(g.root, "t_many", many, 10_000) == 0  # every call said Ok
    assert not g.wasm.is_failed() and g.u64(1100) > 0


def test_reentrant_callback_from_a_host_call_sees_its_own_context() -> None:
    """A host call made while another guest call is on the stack (the allocator running inside
    get_header_map_pairs) restores the outer context afterwards."""
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin)
    ctx.on_create()
    seen: list[Any] = []

    def on_headers(*a: int) -> int:
        seen.append(g.hostcall("proxy_get_header_map_pairs", 0, OUT, OUT2))
        seen.append(g.wasm.current_context)
        return 0

    g.handlers["proxy_on_request_headers"] = on_headers
    ctx.on_request_headers(0, True)
    assert seen[0] in (OK, NOT_FOUND) and seen[1] is ctx


# -- whole plugins through the filter factory ---------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# plugin -> what the load log says (cpp-host / Envoy wording)
LOAD_FAILURES = {
    "wat_no_abi": "Missing or unknown Proxy-Wasm ABI version",
    "wat_unknown_import": "Failed to load Wasm module due to a missing import: env.proxy_does_not_exist",
    "corrupt_garbage": "Failed to",
    "corrupt_truncated": "Failed to",
}


@pytest.mark.parametrize("plugin", list(LOAD_FAILURES))
def test_unloadable_plugin_is_a_config_error_with_a_clear_reason(plugin: str) -> None:
    records = _Records()
    get_logger("wasm").addHandler(records)
    try:
        with pytest.raises(ConfigError, match=f"Unable to create Wasm plugin {plugin}"):
            create_wasm_filter_factory(http_wasm(plugin_config(plugin)), factory_context(FakeDispatcher()))
    finally:
        get_logger("wasm").removeHandler(records)
    assert any(LOAD_FAILURES[plugin] in line for line in records.lines), records.lines


# plugin, request headers -> downstream status (FAIL_CLOSED); the thread serves the next stream.
RUNTIME_FAILURES = {
    "proc_exit": ("wat_proc_exit", [], None),  # the host only logs proc_exit; the plugin continues
    "trap_in_request_headers": ("trap", [("x-trap-phase", "request_headers")], 503),
    "infinite_loop": ("wat_infinite_loop", [], 503),
}


@pytest.mark.parametrize("case", list(RUNTIME_FAILURES))
def test_misbehaving_plugin_fails_its_stream_per_policy(case: str) -> None:
    plugin, headers, status = RUNTIME_FAILURES[case]
    context = factory_context(FakeDispatcher())
    context.extras = {FACTORY_CONTEXT_KEY: SandboxLimits(callback_deadline_ms=30)}
    factory = create_wasm_filter_factory(http_wasm(plugin_config(plugin, name=case)), context)
    s = Stream([factory])
    s.request(headers)
    if status is None:
        assert s.upstream.complete
        assert s.upstream.headers is not None and s.upstream.headers.get("x-after-proc-exit") == "1"
        s.respond(200)
        assert s.downstream.status == 200
    else:
        assert s.downstream.status == status and not s.upstream.complete
    s.finish()


def test_a_trap_fails_the_other_in_flight_streams_of_the_vm_too() -> None:
    """cpp-host CHECK_FAIL: once the VM failed, every stream context on it fails at its next
    callback (503 if the response has not started, else a reset), not only the trapping one."""
    context = factory_context(FakeDispatcher())
    factory = create_wasm_filter_factory(http_wasm(plugin_config("trap", name="shared_vm")), context)
    started = Stream([factory])
    started.request([])
    started.respond(200, [("content-length", "4")], [])
    waiting = Stream([factory])
    waiting.request([])
    trapping = Stream([factory])
    trapping.request([("x-trap-phase", "request_headers")])
    assert trapping.downstream.status == 503
    # The response that had started cannot become a 503: its body never reaches the client (Envoy
    # resets the stream; an HTTP/1 client sees the connection close before the body).
    started.upstream.decoder_callbacks.encode_data(b"body", True)
    assert started.downstream.status == 200 and bytes(started.downstream.body) == b""
    # The one still waiting for its response gets the 503.
    waiting.respond(200, [("content-length", "0")])
    assert waiting.downstream.status == 503
    for s in (started, waiting, trapping):
        s.finish()
