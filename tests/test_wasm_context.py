"""Context lifecycle, callback arguments per ABI version, and status translation."""

from __future__ import annotations

import pytest
import wasmtime

from tests.wasm_host.fakes import FakeStreamEnv, stream_info
from tests.wasm_host.guest import Guest, guest_wat
from wasmproxy.http.filter import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.abi import AbiVersion, CloseType, FailState, FilterStatus
from wasmproxy.wasm.context import FailurePolicy, Plugin
from wasmproxy.wasm.runtime import compile_module
from wasmproxy.wasm.wasm import Wasm


def test_start_creates_root_context_then_vm_start_then_configure() -> None:
    g = Guest()
    assert g.root is not None and g.root.id == 1 and g.root.is_root_context()
    assert g.events == [
        ("proxy_on_context_create", 1, 0, 0),
        ("proxy_on_vm_start", 1, len(b"vmcfg"), 0),
        ("proxy_on_configure", 1, len(b"plugincfg"), 0),
    ]


def test_vm_start_or_configure_refusal_is_reported() -> None:
    g = Guest(start=False)
    assert g.wasm.initialize()
    g.handlers["proxy_on_vm_start"] = lambda *_: 0
    assert g.wasm.start(g.plugin) is None
    g2 = Guest(start=False)
    assert g2.wasm.initialize()
    g2.handlers["proxy_on_configure"] = lambda *_: 0
    root = g2.wasm.start(g2.plugin)
    assert root is not None and not g2.wasm.configure(root, g2.plugin)


def test_http_stream_lifecycle_order() -> None:
    g = Guest()
    g.events.clear()
    env = FakeStreamEnv(stream_info())
    ctx = g.wasm.create_stream_context(g.plugin, env)
    assert ctx.id == 2 and ctx.root_context() is g.root
    req = HeaderMap([(":method", "GET"), (":path", "/")])
    assert ctx.decode_headers(req, False) == FilterHeadersStatus.Continue
    assert ctx.decode_data(bytearray(b"abc"), True) == FilterDataStatus.Continue
    resp = HeaderMap([(":status", "200")])
    assert ctx.encode_headers(resp, False) == FilterHeadersStatus.Continue
    assert ctx.encode_data(bytearray(b"xy"), False) == FilterDataStatus.Continue
    assert ctx.encode_trailers(HeaderMap([("t", "1")])) == FilterTrailersStatus.Continue
    ctx.log(req, resp, None, env.stream_info)
    ctx.on_destroy()
    ctx.on_destroy()  # once only
    assert g.events == [
        ("proxy_on_context_create", 2, 1, 0),
        ("proxy_on_request_headers", 2, 2, 0),
        ("proxy_on_request_body", 2, 3, 1),
        ("proxy_on_response_headers", 2, 1, 0),
        ("proxy_on_response_body", 2, 2, 0),
        ("proxy_on_response_trailers", 2, 1, 0),
        ("proxy_on_log", 2, 0, 0),
        ("proxy_on_done", 2, 0, 0),
        ("proxy_on_delete", 2, 0, 0),
    ]
    assert g.wasm.get_context(2) is None  # deleted contexts are forgotten


def test_abi_0_1_0_header_callbacks_have_no_end_of_stream_flag() -> None:
    g = Guest(AbiVersion.ProxyWasm_0_1_0)
    g.events.clear()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.decode_headers(HeaderMap([("a", "b")]), True)
    assert g.events[-1] == ("proxy_on_request_headers", ctx.id, 1, 0)  # the 3rd value is the guest's filler


def test_request_headers_are_forgotten_after_continue_and_kept_while_stopped() -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    g.handlers["proxy_on_request_headers"] = lambda *_: 1
    ctx.decode_headers(HeaderMap([("a", "b")]), False)
    assert ctx.request_headers is not None
    g.handlers["proxy_on_request_headers"] = lambda *_: 0
    ctx2 = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx2.decode_headers(HeaderMap([("a", "b")]), False)
    assert ctx2.request_headers is None


@pytest.mark.parametrize(("ret", "allow", "expected"), [
    (0, False, FilterHeadersStatus.Continue),
    (1, False, FilterHeadersStatus.StopAllIterationAndWatermark),  # cpp-host issue 143
    (1, True, FilterHeadersStatus.StopIteration),
    (2, False, FilterHeadersStatus.Continue),  # ContinueAndEndStream: Envoy continues
    (3, False, FilterHeadersStatus.StopAllIterationAndBuffer),
    (4, False, FilterHeadersStatus.StopAllIterationAndWatermark),
    (99, False, FilterHeadersStatus.StopAllIterationAndWatermark),  # out of range: clamped
])
def test_headers_status_translation(ret: int, allow: bool, expected: FilterHeadersStatus) -> None:
    plugin = Plugin(name="p", root_id="root", vm_id="vm", allow_on_headers_stop_iteration=allow)
    g = Guest(plugin=plugin)
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    g.handlers["proxy_on_request_headers"] = lambda *_: ret
    g.handlers["proxy_on_response_headers"] = lambda *_: ret
    assert ctx.decode_headers(HeaderMap(), False) == expected
    assert ctx.encode_headers(HeaderMap(), False) == expected


@pytest.mark.parametrize(("ret", "expected"), [
    (0, FilterDataStatus.Continue), (1, FilterDataStatus.StopIterationAndBuffer),
    (2, FilterDataStatus.StopIterationAndWatermark), (3, FilterDataStatus.StopIterationNoBuffer),
    (7, FilterDataStatus.StopIterationNoBuffer),
])
def test_data_status_translation(ret: int, expected: FilterDataStatus) -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.decode_headers(HeaderMap(), False)
    g.handlers["proxy_on_request_body"] = lambda *_: ret
    assert ctx.decode_data(bytearray(b"x"), False) == expected
    assert ctx.buffering_request_body == (expected == FilterDataStatus.StopIterationAndBuffer)


def test_trailers_status_translation() -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.decode_headers(HeaderMap(), False)
    g.handlers["proxy_on_request_trailers"] = lambda *_: 5
    assert ctx.decode_trailers(HeaderMap()) == FilterTrailersStatus.StopIteration


def test_callbacks_before_context_creation_pass_through() -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    g.events.clear()
    assert ctx.decode_data(bytearray(b"x"), True) == FilterDataStatus.Continue
    assert ctx.encode_headers(HeaderMap(), True) == FilterHeadersStatus.Continue
    ctx.on_destroy()
    assert g.events == []


def test_log_creates_the_context_for_streams_that_never_reached_the_plugin() -> None:
    g = Guest()
    g.events.clear()
    env = FakeStreamEnv(stream_info())
    ctx = g.wasm.create_stream_context(g.plugin, env)
    ctx.log(None, HeaderMap([(":status", "400")]), None, env.stream_info)
    assert g.names() == ["proxy_on_context_create", "proxy_on_log"]


def _trapping_guest(policy: FailurePolicy) -> tuple[Guest, FakeStreamEnv]:
    extra = '(func (export "boom") unreachable)'
    plugin = Plugin(name="p", root_id="root", vm_id="vm", failure_policy=policy)
    g = Guest(plugin=plugin, wat=guest_wat(extra=extra))
    env = FakeStreamEnv(stream_info())

    def crash(*_: int) -> int:
        boom = g.wasm.vm.get_function("boom")
        boom()
        return 0

    g.handlers["proxy_on_request_headers"] = crash
    return g, env


def test_trap_fails_the_vm_and_fail_closed_replies_503_once() -> None:
    g, env = _trapping_guest(FailurePolicy.FAIL_CLOSED)
    ctx = g.wasm.create_stream_context(g.plugin, env)
    assert ctx.decode_headers(HeaderMap(), False) == FilterHeadersStatus.StopAllIterationAndWatermark
    assert g.wasm.fail_state == FailState.RuntimeError
    assert "proxy_on_request_headers" in g.wasm.fail_message
    assert env.actions == [("local_reply", 503, b"", [], 14, "wasm_fail_stream")]
    assert ctx.decode_data(bytearray(b"x"), True) == FilterDataStatus.StopIterationNoBuffer
    assert ctx.encode_headers(HeaderMap(), True) == FilterHeadersStatus.Continue  # reply already sent
    assert len(env.actions) == 1
    # A failed VM is never called again.
    ctx2 = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    n = len(g.events)
    ctx2.decode_headers(HeaderMap(), True)
    assert len(g.events) == n


def test_fail_open_passes_traffic_through_a_failed_vm() -> None:
    g, env = _trapping_guest(FailurePolicy.FAIL_OPEN)
    ctx = g.wasm.create_stream_context(g.plugin, env)
    assert ctx.decode_headers(HeaderMap(), False) == FilterHeadersStatus.Continue
    assert g.wasm.is_failed()
    assert env.actions == []


def test_fail_callbacks_run_on_failure() -> None:
    g, env = _trapping_guest(FailurePolicy.FAIL_CLOSED)
    seen: list[FailState] = []
    g.wasm.add_fail_callback(seen.append)
    g.wasm.create_stream_context(g.plugin, env).decode_headers(HeaderMap(), False)
    assert seen == [FailState.RuntimeError]


def test_tcp_lifecycle() -> None:
    g = Guest()
    g.events.clear()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    assert ctx.on_new_connection() == FilterStatus.Continue
    g.handlers["proxy_on_downstream_data"] = lambda *_: 1
    data = bytearray(b"hello")
    assert ctx.on_data(data, False) == FilterStatus.StopIteration
    assert ctx.downstream_data_buffer is data
    assert ctx.on_write(bytearray(b"resp"), True) == FilterStatus.Continue
    ctx.downstream_connection_closed(CloseType.Remote)
    assert g.names() == [
        "proxy_on_context_create", "proxy_on_new_connection", "proxy_on_downstream_data",
        "proxy_on_upstream_data", "proxy_on_upstream_connection_close",
        "proxy_on_downstream_connection_close", "proxy_on_done", "proxy_on_log", "proxy_on_delete"]
    assert g.events[-4][2] == CloseType.Remote


def test_root_shutdown_calls_done_then_delete() -> None:
    g = Guest()
    g.events.clear()
    g.wasm.start_shutdown()
    assert g.names() == ["proxy_on_done", "proxy_on_delete"]
    assert g.wasm.root_contexts == {}


def test_second_root_context_for_another_plugin() -> None:
    g = Guest()
    other = Plugin(name="q", root_id="other", vm_id="vm", plugin_configuration=b"x")
    root2 = g.wasm.start(other)
    assert root2 is not None and root2.id == 2 and root2.root_id == "other"
    assert g.wasm.get_root_context(other) is root2
    assert g.wasm.start(other) is root2  # started again: same root context


def test_missing_abi_marker_fails_with_cpp_host_message() -> None:
    module = compile_module(wasmtime.wat2wasm(guest_wat(abi_marker=False)), name="nomarker")
    wasm = Wasm(module, post=lambda cb: None, extra_host_functions={("test", "event"): lambda *a: 0})
    assert not wasm.initialize()
    assert wasm.fail_state == FailState.UnableToInitializeCode
    assert "Missing or unknown Proxy-Wasm ABI version" in wasm.fail_message


def test_missing_malloc_fails_and_proxy_on_memory_allocate_is_accepted() -> None:
    hook = {("test", "event"): lambda *a: 1}
    module = compile_module(wasmtime.wat2wasm(guest_wat(malloc="")), name="nomalloc")
    wasm = Wasm(module, post=lambda cb: None, extra_host_functions=hook)
    assert not wasm.initialize()
    assert wasm.fail_state == FailState.MissingFunction
    module = compile_module(wasmtime.wat2wasm(guest_wat(malloc="proxy_on_memory_allocate")), name="alloc")
    wasm = Wasm(module, post=lambda cb: None, extra_host_functions=hook)
    assert wasm.initialize()
    assert wasm.alloc_memory(16) == 32768


def test_missing_import_fails_to_initialize() -> None:
    wat = '(module (import "env" "proxy_nonexistent" (func)) (func (export "proxy_abi_version_0_2_1")))'
    wasm = Wasm(compile_module(wasmtime.wat2wasm(wat), name="badimport"), post=lambda cb: None)
    assert not wasm.initialize()
    assert "env.proxy_nonexistent" in wasm.fail_message


def test_initialize_runs_reactor_initialize_and_main() -> None:
    extra = """
      (func (export "_initialize") (drop (call $event (i32.const 0) (i32.const 100) (i32.const 0) (i32.const 0) (i32.const 0))))
      (func (export "main") (param i32 i32) (result i32)
        (call $event (i32.const 0) (i32.const 200) (local.get 0) (local.get 1) (i32.const 0)))"""
    g = Guest(wat=guest_wat(extra=extra), start=False)
    assert g.wasm.initialize()
    assert g.events == [("proxy_on_context_create", 100, 0, 0), ("proxy_on_context_create", 200, 0, 0)]


def test_clone_is_an_independent_instance_that_initializes_again() -> None:
    extra = '(func (export "_start") (drop (call $event (i32.const 0) (i32.const 300) (i32.const 0) (i32.const 0) (i32.const 0))))'
    g = Guest(wat=guest_wat(extra=extra))
    g.memory.write(1024, b"base")
    posted: list = []
    clone = g.wasm.clone(post=posted.append)
    assert clone.initialize()
    assert clone.vm is not g.wasm.vm
    assert clone.vm.memory.read(1024, 4) == b"\0\0\0\0"
    assert clone.abi_version == g.wasm.abi_version and clone.vm_id == g.wasm.vm_id
    assert [e for e in g.events if e[1] == 300] == [("proxy_on_context_create", 300, 0, 0)] * 2
    root = clone.start(g.plugin)
    assert root is not None and root.id == 1


@pytest.mark.parametrize(("policy", "expected"), [
    (FailurePolicy.FAIL_OPEN, FilterHeadersStatus.Continue),
    (FailurePolicy.FAIL_CLOSED, FilterHeadersStatus.StopAllIterationAndWatermark),
])
def test_stream_without_a_vm_follows_the_failure_policy(policy: FailurePolicy, expected: FilterHeadersStatus) -> None:
    from wasmproxy.wasm.context import ContextBase

    env = FakeStreamEnv(stream_info())
    ctx = ContextBase.stream_context(None, 1, Plugin(name="p", failure_policy=policy), env)
    assert ctx.decode_headers(HeaderMap(), True) == expected
    assert env.actions == ([] if policy == FailurePolicy.FAIL_OPEN else
                           [("local_reply", 503, b"", [], 14, "wasm_fail_stream")])
    ctx.log(None, None, None, env.stream_info)
    ctx.on_destroy()


def test_closing_the_last_wasm_of_a_vm_id_drops_its_shared_data() -> None:
    from wasmproxy.wasm.shared_data import global_shared_data

    vm_id = "test_closing_the_last_wasm"
    a = Guest(vm_id=vm_id)
    b = Guest(vm_id=vm_id)
    global_shared_data.set(vm_id, b"k", b"v", 0)
    a.events.clear()
    a.wasm.close()
    assert a.names() == ["proxy_on_done", "proxy_on_delete"]
    assert global_shared_data.get(vm_id, b"k")[0] == 0  # b still holds the vm_id
    b.wasm.close()
    assert global_shared_data.get(vm_id, b"k")[0] == 1  # NotFound: the namespace is gone
