"""The Wasm HTTP filter without sockets: real plugins, the real FilterManager, a scripted upstream.

Expectations are the ones tests/envoy_plugins/ pins against real Envoy 1.40.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.wasm_filter_support import FakeDispatcher, Stream, factory_context, http_wasm, plugin_config
from wasmproxy.config.errors import ConfigError
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.http_filter import create_wasm_filter_factory
from wasmproxy.wasm.shared_data import global_shared_data


@pytest.fixture
def dispatcher() -> Iterator[FakeDispatcher]:
    yield FakeDispatcher()


def make_factory(dispatcher: FakeDispatcher, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    context = factory_context(dispatcher)
    return create_wasm_filter_factory(http_wasm(plugin_config(*args, **kwargs)), context), context  # type: ignore[arg-type]


def test_headers_plugin_edits_request_and_response(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "headers", "response_headers add response_headers x-from-config c")
    s = Stream([factory])
    s.request([("x-headers-ops", "request_headers add request_headers x-added a;request_headers remove request_headers"
                                 " x-drop"), ("x-drop", "1")])
    assert s.upstream.complete and s.upstream.headers is not None
    assert s.upstream.headers.get("x-added") == "a" and s.upstream.headers.get("x-drop") is None
    s.respond(200, [("content-type", "text/plain")], b"hello")
    assert s.downstream.status == 200 and bytes(s.downstream.body) == b"hello"
    assert s.downstream.headers is not None and s.downstream.headers.get("x-from-config") == "c"
    s.finish()


def test_trailers_reach_the_plugin_and_the_upstream(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "headers")
    s = Stream([factory])
    s.request([("x-headers-ops", "request_trailers add request_trailers x-rt 1;"
                                 "response_trailers add response_trailers x-rtr 2")],
              [b"abc"], trailers=[("t", "v")])
    assert bytes(s.upstream.body) == b"abc"
    assert s.upstream.trailers is not None and s.upstream.trailers.items() == [("t", "v"), ("x-rt", "1")]
    s.respond(200, body=[b"x"], trailers=[("u", "w")])
    assert s.downstream.trailers is not None and s.downstream.trailers.items() == [("u", "w"), ("x-rtr", "2")]
    s.finish()


def test_buffered_request_body_sees_the_growing_total(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "body")
    s = Stream([factory])
    s.request([("x-body-ops", "request buffer;request append !")], [b"abc", b"def"])
    assert bytes(s.upstream.body) == b"abcdef!"
    s.respond(200)
    headers = s.downstream.headers
    assert headers is not None
    assert headers.get("x-body-request-eos") == "0,1"
    assert headers.get("x-body-request-sizes") == "3,6"  # each callback sees the whole buffer (Envoy 1.40)
    s.finish()


def test_response_body_upper_cased_when_buffered(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "body")
    s = Stream([factory])
    s.request([("x-body-ops", "response buffer;response upper")])
    s.respond(200, body=[b"hello ", b"world"])
    assert bytes(s.downstream.body) == b"HELLO WORLD"
    s.finish()


def test_local_reply_from_request_headers_with_extra_headers(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "local_reply", "phase request_headers\nstatus 418\nbody teapot\n"
                                                         "header x-cfg one\ndetails my details")
    s = Stream([factory])
    s.request([])
    assert s.upstream.headers is None  # the request never reached the upstream
    assert s.downstream.status == 418 and bytes(s.downstream.body) == b"teapot"
    assert s.downstream.headers is not None and s.downstream.headers.get("x-cfg") == "one"
    assert s.stream_info.response_code_details == "my_details"
    s.finish()


def test_local_reply_from_response_headers_replaces_the_response(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "local_reply", "phase response_headers\nstatus 401\nbody no")
    s = Stream([factory])
    s.request([])
    s.respond(200, body=b"upstream body")
    assert s.downstream.status == 401 and bytes(s.downstream.body) == b"no"
    s.finish()


def test_pause_on_request_headers_resumes_on_tick(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "pause")
    s = Stream([factory])
    s.request([("x-pause-request", "tick")])
    assert s.upstream.headers is None
    timers = dispatcher.armed_timers()
    assert len(timers) == 1
    timers[0].fire()
    assert s.upstream.headers is not None and s.upstream.headers.get("x-resumed-by") == "tick"
    s.respond(200)
    assert s.downstream.status == 200
    s.finish()


def test_pause_resumes_on_http_call_response(dispatcher: FakeDispatcher) -> None:
    context = factory_context(dispatcher)
    factory = create_wasm_filter_factory(http_wasm(plugin_config("pause")), context)
    s = Stream([factory])
    s.request([("x-pause-request", "http_call")])
    assert s.upstream.headers is None
    requests = context.cluster_manager.tlcm.async_client.requests  # type: ignore[attr-defined]
    assert len(requests) == 1
    cluster, headers, _body, _timeout, callbacks = requests[0]
    assert cluster == "echo" and headers.get(":path") == "/callout"
    callbacks.on_success(HeaderMap([(":status", "200")]), b"callout-body", None)
    assert s.upstream.headers is not None
    assert s.upstream.headers.get("x-resumed-by") == "http_call"
    assert s.upstream.headers.get("x-callout-status") == "200"
    assert s.upstream.headers.get("x-callout-body") == "callout-body"
    s.respond(200)
    s.finish()


def test_pause_http_call_failure_gives_the_plugin_no_headers(dispatcher: FakeDispatcher) -> None:
    context = factory_context(dispatcher)
    factory = create_wasm_filter_factory(http_wasm(plugin_config("pause")), context)
    s = Stream([factory])
    s.request([("x-pause-request", "http_call")])
    callbacks = context.cluster_manager.tlcm.async_client.requests[0][4]  # type: ignore[attr-defined]
    callbacks.on_failure("reset")
    assert s.upstream.headers is not None and s.upstream.headers.get("x-resumed-by") == "http_call"
    s.finish()


def test_http_call_to_an_unknown_cluster_is_bad_argument(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "pause", "cluster nowhere")
    s = Stream([factory])
    s.request([("x-pause-request", "http_call")])
    assert s.upstream.headers is not None  # not paused
    assert s.upstream.headers.get("x-http-call-status") == "2"  # BAD_ARGUMENT
    s.finish()


def test_pause_resumes_on_queue_item_posted_to_the_owner(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "pause", vm_id="pause-queue")
    waiting = Stream([factory])
    waiting.request([("x-pause-request", "queue")])
    assert waiting.upstream.headers is None
    producer = Stream([factory])
    producer.request([("x-pause-enqueue", "item-1")])
    assert waiting.upstream.headers is None  # delivered through the owner's dispatcher
    dispatcher.run_posted()
    assert waiting.upstream.headers is not None
    assert waiting.upstream.headers.get("x-queue-item") == "item-1"
    waiting.finish()
    producer.finish()


def test_shared_counter_counts_across_streams(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "shared", vm_id="shared-http-filter")
    values = []
    for _ in range(3):
        s = Stream([factory])
        s.request([])
        s.respond(200)
        assert s.downstream.headers is not None
        values.append(int(s.downstream.headers.get("x-shared-counter") or 0))
        s.finish()
    assert values[1] == values[0] + 1 and values[2] == values[0] + 2
    assert global_shared_data.get("shared-http-filter", b"shared.counter")[0] == 0


def test_metrics_go_to_the_store_under_wasmcustom(dispatcher: FakeDispatcher) -> None:
    factory, context = make_factory(dispatcher, "metrics", vm_configuration="m_")
    for _ in range(2):
        s = Stream([factory])
        s.request([])
        s.respond(200)
        s.finish()
    assert context.main_store.counter("wasmcustom.m_requests").value == 2


def test_properties_come_from_stream_info(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "props", root_id="", name="props-plugin")
    s = Stream([factory])
    s.request([("x-props-get", "request.path,plugin_name,source.port")])
    s.respond(200)
    headers = s.downstream.headers
    assert headers is not None
    assert headers.get("x-prop-request.path") == "0:/"
    assert headers.get("x-prop-plugin_name") == "0:props-plugin"
    s.finish()


def test_assemblyscript_plugin_gets_its_configuration(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "as_header", "hello-as", root_id="as_header")
    s = Stream([factory])
    s.request([])
    s.respond(200)
    assert s.downstream.headers is not None and s.downstream.headers.get("x-as-header") == "hello-as"
    s.finish()


def test_plugin_that_fails_to_configure_rejects_the_config(dispatcher: FakeDispatcher) -> None:
    with pytest.raises(ConfigError, match="Unable to create Wasm plugin trap"):
        make_factory(dispatcher, "trap", "fail_configure")


def test_stream_destroyed_while_paused_is_not_resumed(dispatcher: FakeDispatcher) -> None:
    factory, _ = make_factory(dispatcher, "pause", vm_id="pause-destroyed")
    s = Stream([factory])
    s.request([("x-pause-request", "tick")])
    s.manager.reset_stream()
    s.finish()  # proxy_on_done / proxy_on_delete while the plugin still waits for its tick
    for timer in dispatcher.armed_timers():
        timer.fire()
    assert s.upstream.headers is None
    after = Stream([factory])  # the VM is fine
    after.request([])
    after.respond(200)
    assert after.downstream.status == 200
    after.finish()


@pytest.mark.parametrize("allow", [False, True])
def test_allow_on_headers_stop_iteration_lets_the_body_through(dispatcher: FakeDispatcher, allow: bool) -> None:
    """Headers StopIteration is StopAllIterationAndWatermark unless allowed: only then does a body
    chunk (which the plugin continues) resume the chain before the plugin does."""
    from google.protobuf import wrappers_pb2

    proto = plugin_config("pause", vm_id=f"pause-allow-{allow}")
    if allow:
        proto.allow_on_headers_stop_iteration.CopyFrom(wrappers_pb2.BoolValue(value=True))
    factory = create_wasm_filter_factory(http_wasm(proto), factory_context(dispatcher))
    s = Stream([factory])
    s.request([("x-pause-request", "tick")], [b"body"])
    if allow:
        assert s.upstream.headers is not None and s.upstream.headers.get("x-resumed-by") is None
    else:
        assert s.upstream.headers is None
    dispatcher.armed_timers()[0].fire()
    assert s.upstream.headers is not None and bytes(s.upstream.body) == b"body"
    s.finish()
