"""FilterManager iteration, pinned to Envoy's filter_manager.cc semantics with scripted filters."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from wasmproxy.http.filter import FilterDataStatus as D
from wasmproxy.http.filter import FilterHeadersStatus as H
from wasmproxy.http.filter import FilterTrailersStatus as T
from wasmproxy.http.filter import PassThroughFilter
from wasmproxy.http.filter_manager import FilterManager
from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo


class Owner:
    """FilterManagerCallbacks that record what reaches the codec."""

    def __init__(self) -> None:
        self.out: list[tuple] = []
        self.ended = 0
        self.resets = 0
        self.too_large: list[str] = []
        self.watermarks: list[str] = []
        self.timeout_disarmed = 0

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.out.append(("headers", headers.get(":status"), end_stream))

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        self.out.append(("1xx", headers.get(":status")))

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.out.append(("data", data, end_stream))

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.out.append(("trailers", trailers.items()))

    def end_stream(self) -> None:
        self.ended += 1

    def reset_stream(self) -> None:
        self.resets += 1

    def create_filter_chain(self) -> None:
        pass

    def route(self) -> object | None:
        return "route"

    def clear_route_cache(self) -> None:
        pass

    def disarm_request_timeout(self) -> None:
        self.timeout_disarmed += 1

    def on_request_data_too_large(self) -> None:
        self.too_large.append("request")

    def on_response_data_too_large(self) -> None:
        self.too_large.append("response")

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.watermarks.append("decoder-above")

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.watermarks.append("decoder-below")

    def on_encoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.watermarks.append("encoder-above")

    def on_encoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.watermarks.append("encoder-below")


class Scripted(PassThroughFilter):
    """Returns scripted statuses (or runs callables) per callback, and logs what it saw."""

    def __init__(self, name: str, log: list, **script: Any) -> None:
        self.name = name
        self.log = log
        self.script = {k: list(v) if isinstance(v, list) else [v] for k, v in script.items()}
        self.destroyed = 0

    def _next(self, key: str, default: Any, *args: Any) -> Any:
        queue = self.script.get(key)
        if not queue:
            return default
        action = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(action) and not isinstance(action, (H, D, T)):
            return action(self, *args)
        return action

    def decode_headers(self, headers, end_stream):
        self.log.append((self.name, "dh", end_stream))
        return self._next("dh", H.Continue, headers, end_stream)

    def decode_data(self, data, end_stream):
        self.log.append((self.name, "dd", bytes(data), end_stream))
        return self._next("dd", D.Continue, data, end_stream)

    def decode_trailers(self, trailers):
        self.log.append((self.name, "dt"))
        return self._next("dt", T.Continue, trailers)

    def encode_headers(self, headers, end_stream):
        self.log.append((self.name, "eh", end_stream))
        return self._next("eh", H.Continue, headers, end_stream)

    def encode_data(self, data, end_stream):
        self.log.append((self.name, "ed", bytes(data), end_stream))
        return self._next("ed", D.Continue, data, end_stream)

    def encode_trailers(self, trailers):
        self.log.append((self.name, "et"))
        return self._next("et", T.Continue, trailers)

    def on_destroy(self):
        self.destroyed += 1
        self.log.append((self.name, "destroy"))


class Router(Scripted):
    """A terminal filter that records the body it is given and answers on request end."""

    def __init__(self, log: list, respond: bool = True, **script: Any) -> None:
        super().__init__("router", log, **script)
        self.body = bytearray()
        self.respond = respond

    def decode_headers(self, headers, end_stream):
        status = super().decode_headers(headers, end_stream)
        if end_stream and self.respond:
            self.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), True)
        return status

    def decode_data(self, data, end_stream):
        status = super().decode_data(data, end_stream)
        if status == D.Continue:
            self.body += data
        if end_stream and self.respond:
            self.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
            self.decoder_callbacks.encode_data(b"resp", True)
        return status


def make(*filters: Any, limit: int = 1024 * 1024) -> tuple[FilterManager, Owner]:
    owner = Owner()
    info = StreamInfo(ConnectionInfo(1, Address("127.0.0.1", 80), Address("127.0.0.1", 5555)))
    fm = FilterManager(owner, dispatcher=None, stream_info=info, stream_id=7, buffer_limit=limit)  # type: ignore[arg-type]
    for f in filters:
        fm.add_stream_filter(f)
    return fm, owner


def req(method: str = "GET") -> HeaderMap:
    return HeaderMap([(":method", method), (":path", "/"), (":authority", "a"), (":scheme", "http")])


# -- order ---------------------------------------------------------------------------------


def test_decoders_in_order_encoders_in_reverse_then_destroy_once():
    log: list = []
    a, b = Scripted("a", log), Scripted("b", log)
    fm, owner = make(a, b, Router(log))
    fm.decode_headers(req(), True)
    assert log == [("a", "dh", True), ("b", "dh", True), ("router", "dh", True),
                   ("router", "eh", True), ("b", "eh", True), ("a", "eh", True)]
    assert owner.out == [("headers", "200", True)] and owner.ended == 1
    fm.destroy_filters()
    fm.destroy_filters()
    assert (a.destroyed, b.destroyed) == (1, 1)


def test_access_log_runs_once_with_the_final_headers():
    seen = []

    class Log:
        def log(self, rq, rs, rt, info):
            seen.append((rq.get(":method"), rs.get(":status")))

    log: list = []
    fm, _ = make(Router(log))
    fm.add_access_log_handler(Log())
    fm.decode_headers(req(), True)
    fm.log()
    fm.log()
    assert seen == [("GET", "200")]


# -- decode: headers statuses -------------------------------------------------------------


def test_stop_iteration_then_continue_resumes_at_the_next_filter():
    log: list = []
    a = Scripted("a", log, dh=H.StopIteration)
    fm, owner = make(a, Router(log))
    fm.decode_headers(req(), True)
    assert [e for e in log if e[0] == "router"] == []
    a.decoder_callbacks.continue_decoding()
    assert ("router", "dh", True) in log
    assert log.count(("a", "dh", True)) == 1
    assert owner.out == [("headers", "200", True)]


def test_stop_iteration_lets_data_reach_the_stopped_filter_but_not_later_ones():
    log: list = []
    a = Scripted("a", log, dh=H.StopIteration)
    router = Router(log)
    fm, owner = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"abc", False)
    assert ("a", "dd", b"abc", False) in log
    # Data Continue from a filter stopped on headers buffers and continues (commonContinue).
    assert ("router", "dh", False) in log and router.body == b"abc"
    fm.decode_data(b"de", True)
    assert router.body == b"abcde"
    assert owner.out[-1] == ("data", b"resp", True)


def test_stop_all_and_buffer_holds_data_without_calling_the_filter_until_continue():
    log: list = []
    a = Scripted("a", log, dh=H.StopAllIterationAndBuffer)
    router = Router(log)
    fm, owner = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"ab", False)
    fm.decode_data(b"cd", True)
    assert [e for e in log if e[1] == "dd"] == []
    assert fm.buffered_request_data == b"abcd"
    a.decoder_callbacks.continue_decoding()
    # The stopped filter now sees the buffered data itself, then the rest of the chain.
    assert ("a", "dd", b"abcd", True) in log
    assert ("router", "dh", False) in log and router.body == b"abcd"
    assert fm.buffered_request_data == b""
    assert owner.out[-1] == ("data", b"resp", True)


def test_stop_all_and_buffer_over_the_limit_is_413():
    log: list = []
    a = Scripted("a", log, dh=H.StopAllIterationAndBuffer)
    fm, owner = make(a, Router(log), limit=4)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"abc", False)
    assert owner.out == []
    fm.decode_data(b"de", False)
    assert owner.too_large == ["request"]
    assert owner.out == [("headers", "413", False), ("data", b"Payload Too Large", True)]
    assert fm.stream_info.response_code_details == "request_payload_too_large"


def test_stop_all_and_watermark_over_the_limit_applies_flow_control_instead():
    log: list = []
    a = Scripted("a", log, dh=H.StopAllIterationAndWatermark)
    router = Router(log)
    fm, owner = make(a, router, limit=4)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"abcdef", False)
    assert owner.watermarks == ["decoder-above"] and owner.out == []
    a.decoder_callbacks.continue_decoding()
    assert owner.watermarks == ["decoder-above", "decoder-below"]
    assert router.body == b"abcdef"


def test_continue_and_dont_end_stream_lets_a_filter_add_a_body():
    log: list = []

    def add_body(self, headers, end_stream):
        self.decoder_callbacks.add_decoded_data(b"added", False)
        return H.Continue

    a = Scripted("a", log, dh=add_body)
    router = Router(log)
    fm, owner = make(a, router)
    fm.decode_headers(req("POST"), True)
    # A header-only request gained a body: later filters get headers without end_stream, then it.
    assert ("router", "dh", False) in log
    assert ("router", "dd", b"added", True) in log and router.body == b"added"


def test_terminal_filter_stop_does_not_block_a_body_added_earlier():
    log: list = []

    def add_body(self, headers, end_stream):
        self.decoder_callbacks.add_decoded_data(b"x", False)
        return H.Continue

    a = Scripted("a", log, dh=add_body)
    router = Router(log, respond=False, dh=H.StopIteration)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), True)
    assert ("router", "dd", b"x", True) in log


# -- decode: data statuses -----------------------------------------------------------------


def test_stop_iteration_and_buffer_accumulates_and_filter_sees_the_whole_buffer():
    log: list = []
    a = Scripted("a", log, dd=[D.StopIterationAndBuffer, D.StopIterationAndBuffer, D.Continue])
    router = Router(log)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"1", False)
    fm.decode_data(b"2", False)
    assert router.body == b"" and fm.buffered_request_data == b"12"
    fm.decode_data(b"3", True)
    # The filter sees the new chunk; its Continue releases everything buffered (commonContinue).
    assert ("a", "dd", b"3", True) in log
    assert router.body == b"123" and ("router", "dd", b"123", True) in log


def test_stop_iteration_and_buffer_then_continue_decoding_sends_the_buffer():
    log: list = []
    a = Scripted("a", log, dd=D.StopIterationAndBuffer)
    router = Router(log)
    fm, owner = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"12", False)
    fm.decode_data(b"34", True)
    assert router.body == b""
    a.decoder_callbacks.continue_decoding()
    assert router.body == b"1234"
    assert ("router", "dd", b"1234", True) in log
    assert owner.out[-1] == ("data", b"resp", True)


def test_stop_iteration_and_buffer_over_the_limit_is_413_and_watermark_is_flow_control():
    log: list = []
    fm, owner = make(Scripted("a", log, dd=D.StopIterationAndBuffer), Router(log), limit=3)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"1234", False)
    assert owner.out[0] == ("headers", "413", False)
    fm.decode_data(b"more", True)  # ignored: the response is complete
    assert not [e for e in log if e[:2] == ("a", "dd") and e[2] == b"more"]

    log = []
    fm, owner = make(Scripted("a", log, dd=D.StopIterationAndWatermark), Router(log), limit=3)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"1234", False)
    assert owner.out == [] and owner.watermarks == ["decoder-above"]


def test_stop_iteration_no_buffer_drops_the_chunk_and_keeps_end_stream_for_continue():
    log: list = []

    def swallow(self, data, end_stream):
        data.clear()
        return D.StopIterationNoBuffer

    a = Scripted("a", log, dd=swallow)
    router = Router(log)
    fm, owner = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"", True)
    assert fm.buffered_request_data == b""  # an empty buffer carries end_stream
    a.decoder_callbacks.continue_decoding()
    assert ("router", "dd", b"", True) in log
    assert owner.out[-1] == ("data", b"resp", True)


# -- decode: trailers ----------------------------------------------------------------------


def test_trailers_stop_and_continue():
    log: list = []
    a = Scripted("a", log, dt=T.StopIteration)
    router = Router(log, respond=False)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"x", False)
    fm.decode_trailers(HeaderMap([("t", "1")]))
    assert ("router", "dt") not in log
    a.decoder_callbacks.continue_decoding()
    assert ("router", "dt") in log
    assert owner_timeout_disarmed(fm)


def owner_timeout_disarmed(fm: FilterManager) -> bool:
    return fm.callbacks.timeout_disarmed > 0  # type: ignore[attr-defined]


def test_trailers_added_in_decode_data_reach_later_filters():
    log: list = []

    def add_trailers(self, data, end_stream):
        if end_stream:
            self.decoder_callbacks.add_decoded_trailers().add("added", "1")
        return D.Continue

    a = Scripted("a", log, dd=add_trailers)
    router = Router(log, respond=False)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"x", True)
    assert ("router", "dd", b"x", False) in log  # end_stream moved to the trailers
    assert ("router", "dt") in log and ("a", "dt") not in log


# -- encode ---------------------------------------------------------------------------------


def test_encoder_stop_iteration_buffers_until_continue_encoding():
    log: list = []
    a = Scripted("a", log, eh=H.StopIteration, ed=D.StopIterationAndBuffer)
    router = Router(log, respond=False)
    fm, owner = make(a, router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "201")]), False)
    router.decoder_callbacks.encode_data(b"ab", False)
    router.decoder_callbacks.encode_data(b"cd", True)
    assert owner.out == []
    a.encoder_callbacks.continue_encoding()
    assert owner.out == [("headers", "201", False), ("data", b"abcd", True)]
    assert owner.ended == 1


def test_encoder_stop_all_then_continue_sees_buffered_body():
    log: list = []
    a = Scripted("a", log, eh=H.StopAllIterationAndBuffer)
    router = Router(log, respond=False)
    fm, owner = make(a, router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"xy", True)
    assert not [e for e in log if e[:2] == ("a", "ed")]
    a.encoder_callbacks.continue_encoding()
    assert ("a", "ed", b"xy", True) in log
    assert owner.out == [("headers", "200", False), ("data", b"xy", True)]


def test_response_buffer_over_the_limit_is_500_before_headers_went_out():
    log: list = []
    a = Scripted("a", log, eh=H.StopIteration, ed=D.StopIterationAndBuffer)
    router = Router(log, respond=False)
    fm, owner = make(a, router, limit=3)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"12345", False)
    assert owner.too_large == ["response"]
    # Headers were inside the encoder chain: the reply goes straight to the codec.
    assert owner.out == [("headers", "500", False), ("data", b"Internal Server Error", True)]
    assert fm.stream_info.response_code_details == "response_payload_too_large"


def test_encode_trailers_added_in_encode_data():
    log: list = []

    def add(self, data, end_stream):
        if end_stream:
            self.encoder_callbacks.add_encoded_trailers().add("x", "1")
        return D.Continue

    router = Router(log, respond=False)
    fm, owner = make(Scripted("a", log, ed=add), router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"b", True)
    assert owner.out == [("headers", "200", False), ("data", b"b", False), ("trailers", [("x", "1")])]
    assert owner.ended == 1


# -- local replies -------------------------------------------------------------------------


def test_local_reply_from_decode_headers_goes_through_all_encoder_filters():
    log: list = []

    def deny(self, headers, end_stream):
        self.decoder_callbacks.send_local_reply(403, "denied", lambda h: h.add("x-why", "t"), None, "test_denied")
        return H.StopIteration

    a, b = Scripted("a", log), Scripted("b", log, dh=deny)
    fm, owner = make(a, b, Router(log))
    fm.decode_headers(req(), True)
    assert ("router", "dh", True) not in log
    assert ("a", "eh", False) in log and ("b", "eh", False) in log
    assert owner.out == [("headers", "403", False), ("data", b"denied", True)]
    assert fm.response_headers.items() == [
        (":status", "403"), ("content-length", "6"), ("content-type", "text/plain"), ("x-why", "t")]
    assert fm.stream_info.response_code_details == "test_denied"


def test_local_reply_to_head_has_length_but_no_body():
    log: list = []

    def deny(self, headers, end_stream):
        self.decoder_callbacks.send_local_reply(404, "nope")
        return H.StopIteration

    fm, owner = make(Scripted("a", log, dh=deny), Router(log))
    fm.decode_headers(req("HEAD"), True)
    assert owner.out == [("headers", "404", True)]
    assert fm.response_headers.get("content-length") == "4"


def test_local_reply_with_empty_body_has_no_content_type():
    log: list = []
    fm, owner = make(Scripted("a", log, dh=lambda s, h, e: (s.decoder_callbacks.send_local_reply(400, ""), H.StopIteration)[1]))
    fm.decode_headers(req(), True)
    assert fm.response_headers.items() == [(":status", "400")]
    assert owner.out == [("headers", "400", True)]


def test_local_reply_from_a_later_event_after_stop():
    log: list = []
    a = Scripted("a", log, dh=H.StopIteration)
    fm, owner = make(a, Router(log))
    fm.decode_headers(req(), True)
    a.decoder_callbacks.send_local_reply(503, "later")
    assert owner.out == [("headers", "503", False), ("data", b"later", True)]
    a.decoder_callbacks.continue_decoding()  # too late: nothing more happens
    assert ("router", "dh", True) not in log


def test_local_reply_from_encode_headers_replaces_the_response():
    log: list = []

    def replace(self, headers, end_stream):
        self.encoder_callbacks.send_local_reply(502, "bad upstream")
        return H.Continue

    a = Scripted("a", log, eh=replace)
    router = Router(log, respond=False)
    fm, owner = make(a, router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"dropped", True)
    assert owner.out == [("headers", "502", False), ("data", b"bad upstream", True)]
    assert owner.ended == 1


def test_local_reply_after_response_headers_were_sent_resets():
    log: list = []
    router = Router(log, respond=False)
    fm, owner = make(Scripted("a", log), router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.send_local_reply(500, "too late")
    assert owner.out == [("headers", "200", False)]
    assert owner.resets == 1


def test_grpc_local_reply_is_trailers_only():
    log: list = []
    fm, owner = make(Scripted("a", log, dh=lambda s, h, e: (s.decoder_callbacks.send_local_reply(503, "no way"), H.StopIteration)[1]))
    headers = req("POST")
    headers.add("content-type", "application/grpc")
    fm.decode_headers(headers, False)
    assert fm.response_headers.items() == [
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", "no way")]
    assert owner.out == [("headers", "200", True)]


def test_request_data_after_the_response_is_dropped():
    log: list = []
    fm, owner = make(Scripted("a", log, dh=lambda s, h, e: (s.decoder_callbacks.send_local_reply(401, "x"), H.StopIteration)[1]),
                     Router(log))
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"late", True)
    assert not [e for e in log if e[1] == "dd"]


@pytest.mark.parametrize("when", ["dh", "dd"])
def test_reset_stream_from_a_filter(when: str):
    log: list = []

    def reset(self, *args):
        self.decoder_callbacks.reset_stream()
        return H.StopIteration if when == "dh" else D.StopIterationNoBuffer

    fm, owner = make(Scripted("a", log, **{when: reset}), Router(log))
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"x", True)
    assert owner.resets == 1 and owner.out == []


def test_continue_from_a_timer_like_callback_after_data_buffered():
    log: list = []
    pending: list[Callable[[], None]] = []

    def later(self, headers, end_stream):
        pending.append(self.decoder_callbacks.continue_decoding)
        return H.StopAllIterationAndWatermark

    router = Router(log)
    fm, owner = make(Scripted("a", log, dh=later), router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"body", False)
    fm.decode_trailers(HeaderMap([("t", "1")]))
    pending.pop()()
    assert router.body == b"body"
    assert ("router", "dd", b"body", False) in log and ("router", "dt") in log


def test_continue_and_dont_end_stream_hides_end_stream_from_later_filters():
    log: list = []
    fm, _ = make(Scripted("a", log, dh=H.ContinueAndDontEndStream), Router(log, respond=False))
    fm.decode_headers(req(), True)
    assert ("router", "dh", False) in log


def test_upstream_1xx_is_dropped_unless_proxy_100_continue():
    log: list = []
    router = Router(log, respond=False)
    fm, owner = make(Scripted("a", log), router)
    fm.decode_headers(req("POST"), False)
    router.decoder_callbacks.encode_1xx_headers(HeaderMap([(":status", "100")]))
    assert owner.out == []
    fm.proxy_100_continue = True
    router.decoder_callbacks.encode_1xx_headers(HeaderMap([(":status", "100")]))
    assert owner.out == [("1xx", "100")]


def test_terminal_filter_is_never_handed_the_same_buffered_bytes_twice():
    log: list = []
    a = Scripted("a", log, dd=[D.StopIterationAndBuffer, D.Continue], dt=T.StopIteration)
    router = Router(log, respond=False, dd=D.StopIterationNoBuffer)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"once", False)
    a.decoder_callbacks.continue_decoding()
    fm.decode_trailers(HeaderMap([("t", "1")]))
    a.decoder_callbacks.continue_decoding()
    assert [e[2] for e in log if e[:2] == ("router", "dd")] == [b"once", b""]


def test_decoder_only_and_encoder_only_filters_take_their_direction_only():
    log: list = []
    fm, owner = make()
    dec, enc = Scripted("dec", log), Scripted("enc", log)
    fm.add_stream_decoder_filter(dec)
    fm.add_stream_encoder_filter(enc)
    router = Router(log)
    fm.add_stream_filter(router)
    fm.decode_headers(req(), True)
    assert [e[:2] for e in log] == [("dec", "dh"), ("router", "dh"), ("router", "eh"), ("enc", "eh")]


def test_encode_trailers_stop_and_continue():
    log: list = []
    a = Scripted("a", log, et=T.StopIteration)
    router = Router(log, respond=False)
    fm, owner = make(a, router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"x", False)
    router.decoder_callbacks.encode_trailers(HeaderMap([("grpc-status", "0")]))
    assert owner.out == [("headers", "200", False), ("data", b"x", False)] and owner.ended == 0
    a.encoder_callbacks.continue_encoding()
    assert owner.out[-1] == ("trailers", [("grpc-status", "0")]) and owner.ended == 1


def test_data_added_while_decoding_trailers_flows_to_later_filters_inline():
    log: list = []

    def add(self, trailers):
        self.decoder_callbacks.add_decoded_data(b"extra", False)
        return T.Continue

    router = Router(log, respond=False)
    fm, _ = make(Scripted("a", log, dt=add), router)
    fm.decode_headers(req("POST"), False)
    fm.decode_trailers(HeaderMap([("t", "1")]))
    assert router.body == b"extra" and ("router", "dt") in log
    assert log.index(("router", "dd", b"extra", False)) < log.index(("router", "dt"))


def test_encoder_watermark_status_applies_flow_control_to_the_response():
    log: list = []
    a = Scripted("a", log, ed=D.StopIterationAndWatermark)
    router = Router(log, respond=False)
    fm, owner = make(a, router, limit=4)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
    router.decoder_callbacks.encode_data(b"123456", False)
    assert owner.watermarks == ["encoder-above"] and owner.too_large == []
    a.encoder_callbacks.continue_encoding()
    assert owner.watermarks == ["encoder-above", "encoder-below"]
    assert owner.out[-1] == ("data", b"123456", False)


def test_headers_only_response_that_gains_a_body_in_an_encoder():
    log: list = []

    def add(self, headers, end_stream):
        self.encoder_callbacks.add_encoded_data(b"added", False)
        return H.Continue

    router = Router(log, respond=False)
    fm, owner = make(Scripted("a", log, eh=add), router)
    fm.decode_headers(req(), True)
    router.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), True)
    assert owner.out == [("headers", "200", False), ("data", b"added", True)] and owner.ended == 1


def test_add_decoded_data_outside_any_callback_is_buffered_until_continue():
    log: list = []
    a = Scripted("a", log, dh=H.StopIteration)
    router = Router(log, respond=False)
    fm, _ = make(a, router)
    fm.decode_headers(req("POST"), True)
    a.decoder_callbacks.add_decoded_data(b"later", False)  # e.g. from an http_call callback
    assert a.decoder_callbacks.decoding_buffer() == b"later"
    a.decoder_callbacks.continue_decoding()
    assert ("router", "dh", False) in log and ("router", "dd", b"later", True) in log


def test_grpc_local_reply_percent_encodes_the_message():
    log: list = []
    fm, _ = make(Scripted("a", log, dh=lambda s, h, e: (s.decoder_callbacks.send_local_reply(
        403, "50% d\u00e9nied", None, 7), H.StopIteration)[1]))
    headers = req("POST")
    headers.add("content-type", "application/grpc+proto")
    fm.decode_headers(headers, False)
    assert fm.response_headers.get("grpc-status") == "7"
    assert fm.response_headers.get("grpc-message") == "50%25 d%C3%A9nied"


def test_two_local_replies_in_one_decoder_callback_send_the_first():
    log: list = []

    def twice(self, headers, end_stream):
        self.decoder_callbacks.send_local_reply(401, "first")
        self.decoder_callbacks.send_local_reply(500, "second")
        return H.StopIteration

    fm, owner = make(Scripted("a", log, dh=twice), Router(log))
    fm.decode_headers(req(), True)
    assert owner.out == [("headers", "401", False), ("data", b"first", True)]


def test_a_wasm_style_filter_adding_its_chunk_then_buffering_keeps_it_once():
    # Envoy's Wasm filter does addDecodedData(data) in decodeData (so the plugin sees the whole
    # body) and returns StopIterationAndBuffer: the chunk must end up in the buffer once.
    log: list = []

    def gather(self, data, end_stream):
        self.decoder_callbacks.add_decoded_data(data, False)
        assert data == b""
        return D.Continue if end_stream else D.StopIterationAndBuffer

    router = Router(log)
    fm, _ = make(Scripted("a", log, dd=gather), router)
    fm.decode_headers(req("POST"), False)
    fm.decode_data(b"ab", False)
    fm.decode_data(b"cd", True)
    assert router.body == b"abcd"
