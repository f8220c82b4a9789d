"""Real Envoy 1.40 with the body plugin: buffering and set_buffer_bytes semantics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [
        Listener("body", [wasm_filter(plugin("body"))]),
        Listener("configured", [wasm_filter(plugin("body"), "request buffer\nrequest append !\nresponse buffer\nresponse upper")]),
    ]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def _post(envoy: EnvoyRun, ops: str, body: bytes | list[bytes], **headers: str) -> Response:
    r = envoy.request("body", "POST", headers={"x-body-ops": ops, **headers}, body=body)
    assert r.status == 200
    return r


@pytest.mark.parametrize(
    ("ops", "expected", "status"),
    [
        ("request buffer;request append -tail", "abcdef-tail", "0"),
        ("request buffer;request prepend head-", "head-abcdef", "0"),
        ("request buffer;request replace NEW", "NEW", "0"),
        ("request buffer;request upper", "ABCDEF", "0"),
        ("request buffer;request set 0 0 XY", "XYabcdef", "0"),  # start 0, size 0: prepend
        ("request buffer;request set 0 2 XY", "XYcdef", "0"),  # start 0: drain size, then prepend
        ("request buffer;request set 6 0 XY", "abcdefXY", "0"),  # start >= length: append
        ("request buffer;request set 10 0 XY", "abcdefXY", "0"),
        ("request buffer;request set 2 2 XY", "abcdef", "2"),  # inside the buffer: BAD_ARGUMENT
        ("request buffer;request set 2 100 XY", "abcdef", "2"),
    ],
)
def test_set_buffer_bytes_on_the_buffered_request(envoy: EnvoyRun, ops: str, expected: str, status: str) -> None:
    r = _post(envoy, ops, b"abcdef")
    assert r.echo()["body"] == expected
    assert r.header("x-body-request-status") == status
    # The plugin removed content-length, so Envoy re-frames the upstream request.
    assert r.echo_header("content-length") is None


def test_buffered_body_callbacks_see_the_growing_total(envoy: EnvoyRun) -> None:
    r = _post(envoy, "request buffer;request append !", b"abc")
    assert (r.header("x-body-request-sizes"), r.header("x-body-request-eos")) == ("3,3", "0,1")
    r = _post(envoy, "request buffer;request append !", [b"abc", b"def"])
    assert (r.header("x-body-request-sizes"), r.header("x-body-request-eos")) == ("6,6", "0,1")
    assert r.echo()["body"] == "abcdef!"


def test_streaming_mode_edits_every_chunk_including_the_empty_last_one(envoy: EnvoyRun) -> None:
    r = _post(envoy, "request append -tail", [b"abc", b"def"])
    assert (r.header("x-body-request-sizes"), r.header("x-body-request-eos")) == ("6,0", "0,1")
    assert r.echo()["body"] == "abcdef-tail-tail"
    assert r.header("x-body-request-status") == "0,0"


@pytest.mark.parametrize(
    ("ops", "expected"),
    [("request buffer;request get 2 3", "0:cde"), ("request buffer;request get 4 100", "0:ef"),
     ("request buffer;request get 6 1", "0:"), ("request buffer;request get 7 1", "0:")],
)
def test_get_buffer_bytes_clamps_to_the_buffer(envoy: EnvoyRun, ops: str, expected: str) -> None:
    assert _post(envoy, ops, b"abcdef").header("x-body-request-get") == expected


@pytest.mark.parametrize(
    ("ops", "expected"),
    [("response buffer;response upper", b"HELLO WORLD"), ("response upper", b"HELLO WORLD"),
     ("response buffer;response append !", b"hello world!"), ("response append !", b"hello world!!"),
     ("response replace X", b"XX"), ("response buffer;response set 2 3 ZZ", b"hello world")],
)
def test_response_body_rewrites(envoy: EnvoyRun, ops: str, expected: bytes) -> None:
    r = _post(envoy, ops, b"x", **{"x-echo-body": "hello world"})
    assert r.body == expected
    assert r.header("content-length") is None and r.header("transfer-encoding") == "chunked"


def test_buffered_response_with_trailers_never_sees_end_of_stream_in_body(envoy: EnvoyRun) -> None:
    r = _post(envoy, "response buffer;response upper", b"x", **{"x-echo-body": "abc", "x-echo-trailers": "t=1"})
    assert (r.body, r.trailers) == (b"abc", [("t", "1")])


def test_configured_directives(envoy: EnvoyRun) -> None:
    r = envoy.request("configured", "POST", body=b"abc", headers={"x-echo-body": "done"})
    assert (r.status, r.body) == (200, b"DONE")
