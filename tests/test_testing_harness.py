"""wasmproxy.testing on the project's own plugins: the conformance cases of
tests/diff_cases/wasm_*.yaml and tests/envoy_plugins/, re-expressed as harness tests with the
results real Envoy 1.40 gave."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.wasm_filter_support import plugin_path
from wasmproxy.config.errors import ConfigError
from wasmproxy.testing import GrpcResponse, HttpCall, HttpResponse, Response, WasmPlugin
from wasmproxy.testing import pytest_plugin

Load = Callable[..., WasmPlugin]
wasm_plugin = pytest_plugin.wasm_plugin  # the fixture, as the pytest11 entry point provides it


def test_headers_plugin_edits_both_directions(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml headers_plugin_edits_both_directions
    plugin = wasm_plugin(plugin_path("headers"), "response_headers add response_headers x-from-config c",
                         vm_id="harness-headers")
    stream = plugin.http_request([
        ("x-headers-ops", "request_headers add request_headers x-added a;request_headers remove request_headers"
                          " x-drop;response_headers add response_headers x-resp r"),
        ("x-drop", "1")])
    assert stream.request.header("x-added") == "a" and stream.request.header("x-drop") is None
    assert stream.response.status == 200
    assert (stream.response.header("x-from-config"), stream.response.header("x-resp")) == ("c", "r")
    assert [(c.phase, c.status) for c in stream.callbacks] == [("request_headers", "Continue"),
                                                               ("response_headers", "Continue")]
    assert ("x-added", "a") in (stream.callbacks[0].headers or [])
    assert stream.finished


def test_headers_plugin_sees_request_trailers(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml headers_plugin_sees_request_trailers, plus trailer edits
    plugin = wasm_plugin(plugin_path("headers"), vm_id="harness-headers-trailers")
    stream = plugin.stream().send_request(
        [("x-headers-ops", "request_headers get request_headers x-present;request_trailers add request_trailers x-rt 1"),
         ("x-present", "p")], [b"a", b"bc"], trailers=[("t", "v")])
    assert stream.request.body == b"abc" and stream.request.trailers == [("t", "v"), ("x-rt", "1")]
    stream.send_response(200, body=b"ok")
    assert stream.response.header("x-get-x-present") == "0:p"
    assert stream.statuses("request_body") == ["Continue", "Continue"]


def test_body_plugin_buffers_and_appends(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml body_plugin_buffers_and_appends: the upstream got 7 bytes
    plugin = wasm_plugin(plugin_path("body"), vm_id="harness-body")
    stream = plugin.http_request([("x-body-ops", "request buffer;request append !")], [b"abc", b"def"])
    assert stream.request.body == b"abcdef!"
    # Each callback sees the whole buffer so far (Envoy 1.40): sizes 3,6.
    assert stream.response.header("x-body-request-sizes") == "3,6"
    assert stream.response.header("x-body-request-eos") == "0,1"
    assert stream.statuses("request_body") == ["StopIterationAndBuffer", "Continue"]


def test_body_plugin_upper_cases_the_buffered_response(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("body"), vm_id="harness-body")
    stream = plugin.stream().send_request({"x-body-ops": "response buffer;response upper"})
    stream.send_response(200, body=[b"hello ", b"world"])
    assert stream.response.body == b"HELLO WORLD" and stream.response.complete


@pytest.mark.parametrize("phase,status,body,upstream", [
    ("request_headers", "418", "teapot", "none"),  # local_reply_from_request_headers
    ("request_body", "418", "", "headers"),  # local_reply_from_the_request_body
    ("response_headers", "401", "nope", "complete"),  # local_reply_from_response_headers
])
def test_local_replies(wasm_plugin: Load, phase: str, status: str, body: str,
                       upstream: str) -> None:
    plugin = wasm_plugin(plugin_path("local_reply"), vm_id="harness-local-reply")
    headers = [("x-local-reply-phase", phase), ("x-local-reply-status", status), ("x-local-reply-headers", "x-a=1,x-b=2")]
    if body:
        headers.append(("x-local-reply-body", body))
    stream = plugin.http_request(headers, b"some body" if phase == "request_body" else b"",
                                 response=Response([(":status", "200")], b"upstream body"))
    assert stream.response.status == int(status) and stream.response.body == body.encode()
    assert (stream.response.header("x-a"), stream.response.header("x-b")) == ("1", "2")
    seen = "none" if stream.request.headers is None else "complete" if stream.request.complete else "headers"
    assert seen == upstream
    assert stream.local_reply is not None and stream.local_reply.status == int(status)
    assert stream.local_reply.details == "wasm_local_reply"


def test_local_reply_with_grpc_status_on_a_grpc_request(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml local_reply_with_grpc_status_on_a_grpc_request: Envoy answers 200 + grpc-status
    plugin = wasm_plugin(plugin_path("local_reply"), vm_id="harness-local-reply")
    stream = plugin.http_request([(":method", "POST"), (":path", "/svc/Method"), ("content-type", "application/grpc"),
                                  ("x-local-reply-phase", "request_headers"), ("x-local-reply-status", "403"),
                                  ("x-local-reply-grpc_status", "7"), ("x-local-reply-body", "denied")],
                                 b"\0\0\0\0\0")
    assert stream.response.status == 200
    assert stream.response.header("grpc-status") == "7"
    assert stream.local_reply is not None and stream.local_reply.grpc_status == 7


@pytest.mark.parametrize("direction", ["request", "response"])
def test_pause_until_a_tick(wasm_plugin: Load, direction: str) -> None:
    # wasm_plugins.yaml pause_request_until_a_tick / pause_response_until_a_tick
    plugin = wasm_plugin(plugin_path("pause"), "tick_ms 100", vm_id="harness-pause")
    stream = plugin.http_request({f"x-pause-{direction}": "tick"})
    if direction == "request":
        assert stream.request.headers is None and stream.statuses() == ["StopAllIterationAndWatermark"]
    else:
        assert stream.response.headers is None and stream.statuses()[-1] == "StopAllIterationAndWatermark"
    assert plugin.metric("pause_waiting") == 1
    assert plugin.advance(99) == 0
    assert plugin.advance(1) == 1
    if direction == "request":
        assert stream.request.header("x-resumed-by") == "tick"
        stream.send_response(200)
    assert stream.response.status == 200
    if direction == "response":
        assert stream.response.header("x-resumed-by") == "tick"
    assert plugin.metric("pause_waiting") == 0


def test_pause_response_until_a_canned_http_call_answer(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml pause_response_until_an_http_call_answers
    plugin = wasm_plugin(plugin_path("pause"), vm_id="harness-pause", clusters=["echo"])
    plugin.on_http_call(HttpResponse(200, [("content-type", "application/json")], b"{}"), cluster="echo")
    stream = plugin.http_request({"x-pause-response": "http_call"})
    assert stream.response.status == 200
    assert (stream.response.header("x-resumed-by"), stream.response.header("x-callout-status")) == ("http_call", "200")
    [call] = plugin.http_calls
    assert (call.cluster, call.header(":path"), call.header("x-echo-body"), call.answered) == \
        ("echo", "/callout", "callout-body", True)


def test_http_call_answered_by_a_callable_and_by_hand(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("pause"), vm_id="harness-pause", clusters=["echo"])
    plugin.on_http_call(lambda call: HttpResponse(201, body=(call.header("x-echo-body") or "").upper().encode()))
    stream = plugin.http_request({"x-pause-request": "http_call"})
    assert stream.request.header("x-callout-status") == "201"
    assert stream.request.header("x-callout-body") == "CALLOUT-BODY"

    pending = wasm_plugin(plugin_path("pause"), vm_id="harness-pause-pending", clusters=["echo"])
    stream = pending.http_request({"x-pause-request": "http_call"})
    assert stream.request.headers is None
    call: HttpCall = pending.http_calls[0]
    call.fail()  # Envoy's onFailure: the plugin gets the callback with no headers
    assert stream.request.header("x-resumed-by") == "http_call" and stream.request.header("x-callout-status") == ""
    with pytest.raises(RuntimeError):
        call.respond(200)


def test_http_call_to_an_unknown_cluster_is_bad_argument(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("pause"), "cluster nowhere", vm_id="harness-pause-nowhere", clusters=["echo"])
    stream = plugin.http_request({"x-pause-request": "http_call"})
    assert stream.request.header("x-http-call-status") == "2"  # BAD_ARGUMENT, not paused
    assert plugin.http_calls == []


def test_shared_data_preset_read_and_cas(wasm_plugin: Load) -> None:
    # envoy_plugins/test_envoy_shared.py: counter, get/set/CAS, namespacing by vm_id
    plugin = wasm_plugin(plugin_path("shared"), vm_id="harness-shared", shared_data={"preset": "p"})
    first = plugin.http_request({"x-shared-get": "preset"})
    status, cas, value = (first.response.header("x-shared-get-result") or "").split(":")
    assert (status, value) == ("0", "p") and int(cas) > 0
    second = plugin.http_request({"x-shared-set": "k=v1"})
    assert int(second.response.header("x-shared-counter") or 0) == int(first.response.header("x-shared-counter") or 0) + 1
    stored = plugin.get_shared_data("k")
    assert stored is not None and stored[0] == b"v1"
    stale = plugin.http_request([("x-shared-set", "k=v2"), ("x-shared-set-cas", str(stored[1] + 1000))])
    assert stale.response.header("x-shared-set-status") == "8"  # CAS_MISMATCH
    assert plugin.get_shared_data("k", vm_id="harness-other") is None


def test_queue_enqueued_by_the_test_reaches_on_queue_ready(wasm_plugin: Load) -> None:
    # envoy_plugins/test_envoy_shared.py: on_queue_ready of the registering VM logs the items
    plugin = wasm_plugin(plugin_path("shared"), vm_id="harness-queue")
    plugin.enqueue("shared_queue", "a")
    plugin.enqueue("shared_queue", b"b")
    log = plugin.get_shared_data("shared.queue.log")
    assert log is not None and log[0] == b"a,b"
    assert plugin.dequeue("shared_queue") is None  # the plugin took them
    with pytest.raises(KeyError):
        plugin.enqueue("no_such_queue", "x")


def test_pause_resumes_on_a_queue_item(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("pause"), vm_id="harness-pause-queue")
    stream = plugin.http_request({"x-pause-request": "queue"})
    assert stream.request.headers is None
    plugin.enqueue("pause_queue", "item-1")
    assert stream.request.header("x-queue-item") == "item-1"


def test_metrics(wasm_plugin: Load) -> None:
    # envoy_plugins/test_envoy_metrics.py test_counter_gauge_and_histogram
    plugin = wasm_plugin(plugin_path("metrics"), vm_id="harness-metrics", vm_configuration="h_")
    r = plugin.http_request()
    assert r.response.header("x-metrics-counter") == "0:1"
    assert r.response.header("x-metrics-histogram") == "2:0"  # get_metric on a histogram: BAD_ARGUMENT
    assert plugin.http_request({"x-metrics-gauge-add": "5"}).response.header("x-metrics-gauge") == "0:5"
    assert plugin.http_request({"x-metrics-gauge-add": "-2"}).response.header("x-metrics-gauge") == "0:3"
    assert plugin.metric("h_requests") == 3 and plugin.metrics()["wasmcustom.h_gauge"] == 3


def test_logs_are_captured_at_the_configured_level(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("logging"), "cfg", vm_id="harness-logging", log_level="debug")
    plugin.http_request({"x-log-message": "hi"})
    assert "logging: configured: cfg" in plugin.log_messages("info")
    assert "logging: level 0: hi" not in plugin.log_messages()  # trace is below debug
    assert "logging: level 1: hi" in plugin.log_messages("debug")
    assert "logging: level 3: hi" in plugin.log_messages("warn")
    assert "logging: stderr: hi" in plugin.log_messages("error")  # WASI fd 2


def _trap(wasm_plugin: Load, policy: str, config: str = "", **options: object) -> WasmPlugin:
    return wasm_plugin(plugin_path("trap"), config, vm_id=f"harness-trap-{policy}-{config}", name=f"trap-{policy}",
                       failure_policy=policy, **options)


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_OPEN", "FAIL_RELOAD"])
def test_trap_before_the_response_gives_503_then_the_policy(wasm_plugin: Load, policy: str) -> None:
    # envoy_plugins/test_envoy_failures.py test_trap_before_the_response_starts_gives_503, wasm_fail_closed.yaml
    plugin = _trap(wasm_plugin, policy, reload_backoff_ms=100)
    assert plugin.http_request(body=b"x").response.header("x-trap-plugin") == "alive"
    first = plugin.http_request({"x-trap-phase": "request_headers"}, b"x")
    assert (first.response.status, first.response.body) == (503, b"")
    assert first.request.headers is None and plugin.failed
    assert any("Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable" in line.message
               for line in plugin.host_logs)  # Envoy 1.40's log line
    after = plugin.http_request(body=b"x")
    if policy == "FAIL_CLOSED":
        assert after.response.status == 503
    elif policy == "FAIL_OPEN":
        assert not after.has_plugin and after.response.status == 200 and after.response.header("x-trap-plugin") is None
    else:
        assert after.response.status == 503  # within the backoff
        plugin.advance(150)  # past base_interval x 1.5 (jitter)
        reloaded = plugin.http_request(body=b"x")
        assert reloaded.response.header("x-trap-requests") == "1"
        assert plugin.metric("wasm.trap-FAIL_RELOAD.vm_reload_success") == 1


def test_trap_in_the_response_body_resets_the_started_response(wasm_plugin: Load) -> None:
    # wasm_fail_open.yaml trap_in_response_body_resets_then_streams_skip_the_plugin
    plugin = _trap(wasm_plugin, "FAIL_OPEN")
    stream = plugin.stream().send_request({"x-trap-phase": "response_body"}, b"x")
    stream.send_response(200, body=b"upstream body")
    assert stream.response.status == 200 and stream.response.reset and not stream.response.complete
    stream.finish()
    assert plugin.http_request().has_plugin is False


def test_trap_on_tick_kills_the_vm(wasm_plugin: Load) -> None:
    # envoy_plugins/test_envoy_failures.py test_trap_in_on_tick_kills_the_vm (FAIL_CLOSED)
    plugin = _trap(wasm_plugin, "FAIL_CLOSED", "tick 10\ntrap tick")
    assert plugin.http_request().response.status == 200
    assert plugin.advance(10) == 1 and plugin.failed
    assert plugin.http_request().response.status == 503


def test_plugin_that_fails_to_configure_is_rejected() -> None:
    with pytest.raises(ConfigError, match="Unable to create Wasm plugin trap"):
        WasmPlugin(plugin_path("trap"), "fail_configure", vm_id="harness-fail-configure")


def test_assemblyscript_plugin_gets_its_configuration(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml: x-as-header: from-as
    plugin = wasm_plugin(plugin_path("as_header"), "from-as", root_id="as_header", vm_id="harness-as")
    assert plugin.http_request().response.header("x-as-header") == "from-as"


def test_abi_table_subset_as_envoy(wasm_plugin: Load) -> None:
    # envoy_plugins/test_envoy_abi_all.py EXPECTED_REQUEST_PHASE (a subset); grpc to an unknown cluster
    plugin = wasm_plugin(plugin_path("abi_all"), vm_id="harness-abi-all", clusters=["echo"])
    response = plugin.http_request().response
    expected = {"http_call": "0", "http_call-unknown_cluster": "2", "grpc_call-unknown_cluster": "4",
                "grpc_stream-unknown_cluster": "4", "set_shared_data-cas_mismatch": "8",
                "get_shared_data-missing": "1", "enqueue_shared_queue-unknown": "1"}
    assert {name: response.header(f"x-abi-{name}") for name in expected} == expected
    assert plugin.grpc_calls == []


def test_grpc_call_answered_canned_by_callable_and_failed(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("grpc_callout"), "upstream name", vm_id="harness-grpc", clusters=["grpc"])
    plugin.on_grpc_call(lambda call: GrpcResponse(call.request[::-1]), method="test.Echo/Unary")
    stream = plugin.http_request({"x-grpc-mode": "call", "x-grpc-message": "hello"})
    assert stream.response.body == b"call rc=0\nreceive size=5 olleh\n"
    [call] = plugin.grpc_calls
    assert (call.service, call.service_name, call.method_name, call.request) == (b"grpc", "test.Echo", "Unary", b"hello")
    # An unknown cluster named by bytes that are no GrpcService: ParseFailure (Envoy 1.40, abi_all).
    assert plugin.http_request({"x-grpc-mode": "call", "x-grpc-cluster": "nope"}).response.body == b"call rc=4\n"
    plugin.on_grpc_call(GrpcResponse(status=7, status_message="denied"))
    denied = plugin.http_request({"x-grpc-mode": "call"})
    assert denied.response.body == b"call rc=0\ngrpc_close status=7 get_status=7 message=denied\n"


def test_grpc_call_left_pending_is_answered_by_hand(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("grpc_callout"), "upstream name", vm_id="harness-grpc-pending")
    stream = plugin.http_request({"x-grpc-mode": "call", "x-grpc-message": "m"})
    assert stream.response.headers is None and stream.statuses() == ["StopAllIterationAndWatermark"]
    plugin.grpc_calls[0].respond(b"answer")
    assert stream.response.body == b"call rc=0\nreceive size=6 answer\n"


def test_manual_clock_fires_each_timer_at_its_own_time() -> None:
    from wasmproxy.testing import ManualDispatcher

    dispatcher = ManualDispatcher()
    fired: list[float] = []
    start = dispatcher.time_source.monotonic()

    def tick() -> None:
        fired.append(round((dispatcher.time_source.monotonic() - start) * 1000))
        periodic.enable_timer(100)

    periodic = dispatcher.create_timer(tick)
    periodic.enable_timer(100)
    once = dispatcher.create_timer(lambda: fired.append(-1))
    once.enable_timer(150)
    once.enable_timer(250)  # re-armed: fires once, at 250
    cancelled = dispatcher.create_timer(lambda: fired.append(-2))
    cancelled.enable_timer(50)
    cancelled.disable_timer()
    assert dispatcher.advance(300) == 4
    assert fired == [100, 200, -1, 300]
    assert round((dispatcher.time_source.monotonic() - start) * 1000) == 300


def test_client_reset_while_paused_is_never_resumed(wasm_plugin: Load) -> None:
    plugin = wasm_plugin(plugin_path("pause"), "tick_ms 100", vm_id="harness-pause-reset")
    stream = plugin.http_request({"x-pause-request": "tick"})
    assert plugin.metric("pause_waiting") == 1
    stream.reset()
    assert stream.response.reset and not stream.finished
    stream.finish()  # proxy_on_done / proxy_on_delete while the plugin still waits
    assert plugin.metric("pause_waiting") == 0
    assert plugin.advance(100) == 1 and stream.request.headers is None
    assert plugin.http_request().response.status == 200  # the VM is fine


def test_properties_of_the_request_plugin_and_response(wasm_plugin: Load) -> None:
    # wasm_plugins.yaml properties_of_the_request_and_plugin, response_code_property_in_response_headers
    plugin = wasm_plugin(plugin_path("props"), vm_id="harness-props")
    stream = plugin.http_request({":path": "/props/x?q=1", "x-props-get": "request.path,request.url_path,plugin_name",
                                  "x-props-get-response": "response.code"})
    assert stream.response.header("x-prop-request.path") == "0:/props/x?q=1"
    assert stream.response.header("x-prop-request.url_path") == "0:/props/x"
    assert stream.response.header("x-prop-plugin_name") == "0:props"
    assert stream.response.header("x-prop-response.code") == "0:hex:c800000000000000"


def test_a_plugin_that_never_returns_fails_the_stream_instead_of_hanging_the_test(wasm_plugin: Load) -> None:
    # The proxy's default per-callback CPU deadline (100 ms) applies in the harness too.
    plugin = wasm_plugin(plugin_path("wat_infinite_loop"), vm_id="harness-loop")
    stream = plugin.http_request()
    assert stream.response.status == 503 and plugin.failed
    assert any("exceeded its CPU deadline" in line.message for line in plugin.host_logs)
