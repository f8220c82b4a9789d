"""The HTTP/1.1 codec, read like RFC 9112 and pinned to what Envoy 1.40 does on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from wasmproxy.http.codec import ClientCodec, CodecError, ServerCodec, reason_phrase
from wasmproxy.http.headers import HeaderMap


class Recorder:
    """Records codec callbacks as tuples; headers as item lists for easy comparison."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_message_begin(self) -> None:
        self.events.append(("begin",))

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.events.append(("headers", headers.items(), end_stream))

    def on_data(self, data: bytes, end_stream: bool) -> None:
        self.events.append(("data", data, end_stream))

    def on_trailers(self, trailers: HeaderMap) -> None:
        self.events.append(("trailers", trailers.items()))

    def on_1xx(self, headers: HeaderMap) -> None:
        self.events.append(("1xx", headers.items()))

    def on_codec_error(self, error: CodecError) -> None:
        self.events.append(("error", error.status, error.details))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


def server(**kw) -> tuple[ServerCodec, Recorder]:
    rec = Recorder()
    return ServerCodec(rec, **kw), rec


def response(status: int = 200, *pairs: tuple[str, str]) -> HeaderMap:
    return HeaderMap([(":status", str(status)), *pairs])


# -- requests: framing ---------------------------------------------------------------------


def test_request_without_body_delivers_headers_with_end_stream():
    codec, rec = server()
    codec.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n")
    assert rec.events == [
        ("begin",),
        (
            "headers",
            [(":authority", "example.com"), (":path", "/a?b=1"), (":method", "GET"), (":scheme", "http"),
             ("user-agent", "t")],
            True,
        ),
    ]


def test_content_length_body_is_data_then_empty_end_stream_as_envoy():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    codec.feed(b"lo")
    assert rec.events[1][2] is False
    assert rec.events[2:] == [("data", b"hel", False), ("data", b"lo", False), ("data", b"", True)]


def test_chunked_request_body_is_decoded():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n")
    # The chunks of one read reach the stream at once (Envoy's buffered body per dispatch).
    assert rec.events[2:] == [("data", b"abcde", False)]
    codec.feed(b"1\r\nf\r\n0\r\n\r\n")
    assert rec.events[3:] == [("data", b"f", False), ("data", b"", True)]


def test_request_trailers_are_dropped_unless_enabled_as_envoy_enable_trailers():
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: 1\r\n\r\n"
    codec, rec = server()
    codec.feed(raw)
    assert rec.events[-1] == ("data", b"", True)
    codec, rec = server(enable_trailers=True)
    codec.feed(raw)
    assert rec.events[-1] == ("trailers", [("x-t", "1")])


def test_content_length_zero_is_a_headers_only_request():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert rec.events[-1][0] == "headers" and rec.events[-1][2] is True


def test_absolute_form_target_overrides_host():
    codec, rec = server()
    codec.feed(b"GET http://real.example:8080/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n")
    headers = dict(rec.events[1][1])
    assert headers[":authority"] == "real.example:8080"
    assert headers[":path"] == "/p?q"


def test_missing_host_leaves_authority_absent_for_the_connection_manager():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert ":authority" not in dict(rec.events[1][1])


def test_optional_whitespace_around_values_is_dropped():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Custom:   spaced  out \t\r\nX-Empty:\r\n\r\n")
    assert rec.events[1][1][-2:] == [("x-custom", "spaced  out"), ("x-empty", "")]


def test_header_values_keep_raw_bytes_as_latin1():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9\r\n\r\n")
    assert ("x", "caf\xe9") in rec.events[1][1]


# -- pipelining ----------------------------------------------------------------------------


def test_pipelined_request_waits_for_the_response_to_the_first():
    codec, rec = server()
    codec.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.kinds() == ["begin", "headers"]
    assert codec.paused and codec.has_pending_events
    codec.encode_headers(response(200, ("content-length", "0")), True)
    assert rec.kinds() == ["begin", "headers"]  # nothing is delivered from inside encode
    codec.resume()
    assert rec.kinds() == ["begin", "headers", "begin", "headers"]
    assert dict(rec.events[3][1])[":path"] == "/2"


def test_pause_holds_body_events_until_resume():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    codec.pause()
    codec.feed(b"cd")
    assert rec.events[-1] == ("data", b"ab", False)
    codec.resume()
    assert rec.events[-2:] == [("data", b"cd", False), ("data", b"", True)]


def test_early_response_does_not_hold_back_the_rest_of_the_request():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    codec.encode_headers(response(413, ("content-length", "0")), True)
    codec.feed(b"xyGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.events[-1] == ("data", b"", True)
    assert codec.paused  # the next request still waits for resume()
    codec.resume()
    assert rec.kinds()[-2:] == ["begin", "headers"]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                     id="cl-and-te"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", id="double-cl"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", id="negative-cl"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", id="space-in-name"),
        pytest.param(b"GET / HTTP/1.1\r\nx-bad : v\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n", id="no-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nx-bad: a\x01b\r\n\r\n", id="control-char"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", id="cl-not-a-number"),
    ],
)
def test_malformed_and_smuggling_requests_are_400(raw):
    codec, rec = server()
    codec.feed(raw)
    assert rec.events[-1][:2] == ("error", 400)
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.events[-1][0] == "error"  # nothing is parsed after an error


@pytest.mark.parametrize("host", [b"a b", b'a"b', b"a<b", b"a{b", b"a|b", b"a^b", b"a`b", b"a\\b"])
def test_authority_with_characters_outside_rfc3986_is_400(host):
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert rec.events[-1] == ("error", 400, "http.invalid_authority")


@pytest.mark.parametrize("host", [b"a%b", b"a@b", b"[::1]:80", b"a,b", b"a;b", b"a!b", b"a~b", b"a'b", b"a*b"])
def test_authority_characters_envoy_accepts(host):
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert rec.kinds() == ["begin", "headers"]


@pytest.mark.parametrize("connection", [b":path", b"close, :method", b"x0,x1,x2,x3,x4,x5,x6,x7,x8,x9"])
def test_connection_header_nominating_pseudo_headers_or_too_many_is_400(connection):
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: %s\r\n\r\n" % connection)
    assert rec.events[-1] == ("error", 400, "http1.connection_header_rejected")


def test_nine_connection_tokens_are_fine():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x1,x2,x3,x4,x5,x6,x7,x8,x9\r\n\r\n")
    assert rec.kinds() == ["begin", "headers"]


@pytest.mark.parametrize("te", [b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity", b"chunked\r\nTransfer-Encoding: chunked"])
def test_any_transfer_coding_but_chunked_is_501(te):
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n0\r\n\r\n" % te)
    assert rec.events[-1] == ("error", 501, "http1.invalid_transfer_encoding")


def test_chunked_is_case_insensitive():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
    assert rec.events[2:] == [("data", b"x", False), ("data", b"", True)]


def test_bare_lf_line_ends_and_obs_fold_are_accepted_as_envoy_does():
    codec, rec = server()
    codec.feed(b"GET /exact HTTP/1.1\nHost: diff.test\nx-fold: a\r\n b\n\n")
    assert rec.events[1] == ("headers", [(":authority", "diff.test"), (":path", "/exact"), (":method", "GET"),
                                         (":scheme", "http"), ("x-fold", "a b")], True)


def test_repeated_host_values_are_joined_into_one_authority():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: diff.test\r\nHost: example.com\r\n\r\n")
    assert dict(rec.events[1][1])[":authority"] == "diff.test,example.com"


def test_http10_is_426_upgrade_required_by_default():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    assert rec.events == [("begin",), ("error", 426, "low_version")]


def test_http10_accepted_when_configured_and_not_chunked():
    codec, rec = server(accept_http_10=True)
    codec.feed(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    assert codec.protocol == "HTTP/1.0" and not codec.keep_alive
    out = codec.encode_headers(response(200), False)
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and b"chunked" not in out


def test_head_of_exactly_60_kib_is_accepted_and_one_more_byte_is_431():
    # Envoy counts the whole head: request line, header lines, the blank line.
    def request(n: int) -> bytes:
        return b"GET /direct HTTP/1.1\r\nHost: a\r\nX: %s\r\n\r\n" % (b"a" * n)

    assert len(request(61402)) == 60 * 1024
    codec, rec = server()
    codec.feed(request(61402))
    assert rec.kinds() == ["begin", "headers"]
    codec, rec = server()
    codec.feed(request(61403))
    assert rec.events[-1] == ("error", 431, "http1.headers_too_large")


def test_endless_header_is_431_before_it_completes():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    for _ in range(100):
        codec.feed(b"a" * 1024)
        if rec.events[-1][0] == "error":
            break
    assert rec.events[-1] == ("error", 431, "http1.headers_too_large")


def test_101_headers_is_431_and_100_is_fine():
    def request(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(n - 1)) + b"\r\n"

    codec, rec = server()
    codec.feed(request(100))
    assert rec.kinds() == ["begin", "headers"]
    codec, rec = server()
    codec.feed(request(101))
    assert rec.events[-1] == ("error", 431, "http1.too_many_headers")


# -- responses: encoding -------------------------------------------------------------------


def test_status_line_uses_envoys_reason_phrases():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert codec.encode_headers(response(299), True).startswith(b"HTTP/1.1 299 Unknown\r\n")
    assert reason_phrase(431) == "Request Header Fields Too Large"
    assert reason_phrase(413) == "Payload Too Large"


def test_headers_only_response_gets_content_length_zero_after_the_other_headers():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = codec.encode_headers(response(299, ("date", "d"), ("server", "envoy")), True)
    assert out == b"HTTP/1.1 299 Unknown\r\ndate: d\r\nserver: envoy\r\ncontent-length: 0\r\n\r\n"


def test_body_without_content_length_is_chunked():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = codec.encode_headers(response(200, ("x", "1")), False)
    assert out == b"HTTP/1.1 200 OK\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    assert codec.encode_data(b"hello", False) == b"5\r\nhello\r\n"
    assert codec.encode_data(b"", False) == b""
    assert codec.encode_data(b"ab", True) == b"2\r\nab\r\n0\r\n\r\n"


def test_response_trailers_end_the_chunked_body_and_are_sent_only_when_enabled():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(response(200), False)
    assert codec.encode_trailers(HeaderMap([("grpc-status", "0")])) == b"0\r\n\r\n"
    codec, _ = server(enable_trailers=True)
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(response(200), False)
    assert codec.encode_trailers(HeaderMap([("grpc-status", "0")])) == b"0\r\ngrpc-status: 0\r\n\r\n"


def test_content_length_body_is_sent_as_is():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(response(200, ("content-length", "2")), False)
    assert codec.encode_data(b"ok", True) == b"ok"


def test_head_response_keeps_content_length_and_sends_no_body():
    codec, _ = server()
    codec.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert codec.is_head_request
    out = codec.encode_headers(response(200, ("content-length", "5")), False)
    assert b"content-length: 5\r\n" in out
    assert codec.encode_data(b"hello", True) == b""
    codec, _ = server()
    codec.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    # Envoy announces chunked even on a headers-only answer to HEAD (and sends no last chunk).
    assert codec.encode_headers(response(404), True) == b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_are_never_chunked_nor_given_a_length(status):
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = codec.encode_headers(response(status), False)
    assert b"chunked" not in out and b"content-length" not in out
    # Like Envoy's codec, a body given anyway goes out as is (Envoy's direct_response 204 does).
    assert codec.encode_data(b"x", True) == b"x"


def test_any_http_version_but_1_1_is_http10_to_envoy():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")
    assert rec.events[-1] == ("error", 426, "low_version")


def test_100_continue():
    codec, rec = server()
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
    assert ("expect", "100-continue") in rec.events[1][1]
    assert codec.encode_100_continue() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_connection_close_and_keep_alive_reported():
    codec, _ = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert codec.keep_alive is False


# -- client side ---------------------------------------------------------------------------


def client() -> tuple[ClientCodec, Recorder]:
    rec = Recorder()
    return ClientCodec(rec), rec


def request(method: str = "GET", *pairs: tuple[str, str]) -> HeaderMap:
    return HeaderMap([(":method", method), (":path", "/p"), (":authority", "up:80"), (":scheme", "http"), *pairs])


def test_request_line_and_host_from_pseudo_headers():
    codec, _ = client()
    assert codec.encode_request_headers(request("GET", ("x", "1")), True) == (
        b"GET /p HTTP/1.1\r\nhost: up:80\r\nx: 1\r\n\r\n"
    )


def test_bodyless_post_gets_content_length_zero_and_streamed_body_is_chunked():
    codec, _ = client()
    assert b"content-length: 0\r\n" in codec.encode_request_headers(request("POST"), True)
    codec, _ = client()
    assert b"transfer-encoding: chunked\r\n" in codec.encode_request_headers(request("POST"), False)
    assert codec.encode_data(b"abc", False) == b"3\r\nabc\r\n"
    assert codec.encode_data(b"", True) == b"0\r\n\r\n"


def test_response_with_content_length():
    codec, rec = client()
    codec.encode_request_headers(request(), True)
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.events == [
        ("headers", [(":status", "200"), ("content-length", "2")], False),
        ("data", b"ok", False),
        ("data", b"", True),
    ]
    assert codec.response_complete and codec.keep_alive


def test_1xx_then_final_response():
    codec, rec = client()
    codec.encode_request_headers(request("POST"), False)
    codec.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert rec.events == [("1xx", [(":status", "100")]), ("headers", [(":status", "204")], True)]


def test_response_to_head_has_no_body_despite_content_length():
    codec, rec = client()
    codec.encode_request_headers(request("HEAD"), True)
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert rec.events == [("headers", [(":status", "200"), ("content-length", "10")], True)]
    assert codec.response_complete and codec.keep_alive


def test_body_delimited_by_close():
    codec, rec = client()
    codec.encode_request_headers(request(), True)
    codec.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")
    codec.feed_eof()
    assert rec.events[1:] == [("data", b"abc", False), ("data", b"", True)]
    assert codec.response_complete and not codec.keep_alive


def test_close_mid_response_is_an_error():
    codec, rec = client()
    codec.encode_request_headers(request(), True)
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    codec.feed_eof()
    assert rec.events[-1] == ("error", 502, "http1.codec_error")


def test_connection_close_response_is_not_reusable_and_chunked_trailers_dropped():
    codec, rec = client()
    codec.encode_request_headers(request(), True)
    codec.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nT: 1\r\n\r\n")
    assert rec.events[-1] == ("data", b"", True)
    assert not codec.keep_alive


def test_codec_is_reused_for_the_next_request():
    codec, rec = client()
    for i in range(2):
        codec.encode_request_headers(request(), True)
        codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
    assert [e for e in rec.events if e[0] == "data" and e[1]] == [("data", b"0", False), ("data", b"1", False)]


def test_bad_response_is_an_error():
    codec, rec = client()
    codec.encode_request_headers(request(), True)
    codec.feed(b"HTTP/1.1 abc\r\n\r\n")
    assert rec.events[-1][0] == "error"


# -- fuzzing -------------------------------------------------------------------------------

_prefixes = st.sampled_from([
    b"", b"GET / HTTP/1.1\r\nHost: a\r\n", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
])


@settings(max_examples=300, deadline=None)
@given(prefix=_prefixes, body=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=400))
def test_fuzz_server_gives_events_or_a_codec_error_never_another_exception(prefix, body, cut):
    codec, rec = server()
    data = prefix + body
    codec.feed(data[:cut])
    codec.feed(data[cut:])
    for _ in range(10):  # answer each request so pipelined ones are delivered too
        if not codec.paused:
            break
        codec.encode_headers(response(200), True)
        codec.resume()
    assert rec.kinds().count("error") <= 1


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(["GET", "HEAD", "POST"]), data=st.binary(max_size=300), eof=st.booleans())
def test_fuzz_client_gives_events_or_a_codec_error_never_another_exception(method, data, eof):
    codec, rec = client()
    codec.encode_request_headers(request(method), True)
    codec.feed(b"HTTP/1.1 200 OK\r\n" + data)
    if eof:
        codec.feed_eof()
    assert rec.kinds().count("error") <= 1


def test_junk_without_a_line_end_waits_like_envoy_then_is_400_once_the_line_ends():
    codec, rec = server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(response(200, ("content-length", "0")), True)
    codec.resume()
    codec.feed(b"ab")
    codec.feed(b"c")
    assert rec.kinds() == ["begin", "headers"]  # Envoy keeps waiting for the line
    codec.feed(b"\r\n")
    assert rec.events[-2:] == [("begin",), ("error", 400, "http1.codec_error")]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
])
def test_junk_glued_to_a_request_also_waits_for_its_line_end(request_bytes):
    codec, rec = server()
    codec.feed(request_bytes + b"junk")
    codec.encode_headers(response(200, ("content-length", "0")), True)
    codec.resume()
    assert "error" not in rec.kinds()
    codec.feed(b"\n")
    assert rec.events[-1] == ("error", 400, "http1.codec_error")


@pytest.mark.parametrize("data", [b"ab\r\nGET / HT", b"GET / HTTP/1.1 x\r\n\r\nab",
                                  b"GET / HTTP/1.1\r\nHost: a\r\n\r\nabcHEAD / HTTP/1.1\r\n\r\nabc"])
def test_a_complete_bad_line_is_400_at_once(data):
    codec, rec = server()
    codec.feed(data)
    if codec.paused:  # answer the good request first
        codec.encode_headers(response(200, ("content-length", "0")), True)
        codec.resume()
    assert rec.events[-2:] == [("begin",), ("error", 400, "http1.codec_error")]


@pytest.mark.parametrize("method,length", [("GET", False), ("DELETE", False), ("TRACE", False), ("POST", True),
                                           ("PUT", True), ("PATCH", True), ("OPTIONS", True)])
def test_bodiless_request_content_length_zero_as_envoy_sends_it(method, length):
    codec, _ = client()
    assert (b"content-length: 0\r\n" in codec.encode_request_headers(request(method), True)) is length


@pytest.mark.parametrize("line, path", [
    (b"DELETE /rr/1/\t HTTP/1.1", "/rr/1/"), (b"GET\t/a HTTP/1.1", "/a"), (b"GET /a HTTP/1.1\t", "/a"),
    (b"GET /a\tb HTTP/1.1", None), (b"\tGET /a HTTP/1.1", None),
])
def test_request_line_tabs_separate_as_in_envoys_parser(line, path):
    # Balsa splits the request line at runs of SP/HTAB; a tab inside the target or before the
    # method still makes it invalid (both checked against Envoy 1.40).
    codec, rec = server()
    codec.feed(line + b"\r\nHost: a\r\n\r\n")
    if path is None:
        assert rec.events[-1][:2] == ("error", 400)
    else:
        assert rec.events[1][0] == "headers" and dict(rec.events[1][1])[":path"] == path


def test_http10_without_host_gets_the_default_host_and_underscore_headers_are_handled():
    codec, rec = server(accept_http_10=True, default_host_for_http_10="dflt")
    codec.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert dict(rec.events[1][1])[":authority"] == "dflt"
    codec, rec = server(headers_with_underscores_action=1)
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nx_y: 1\r\n\r\n")
    assert rec.events[-1] == ("error", 400, "http1.unexpected_underscore")
