"""Fuzzing the HTTP/1 server codec beyond tests/test_codec.py: a well-formed request (random
headers, content-length or chunked body, trailers) parses to the same events however the bytes
are split across reads, and random bytes glued after a complete request never make the codec
raise (they give at most one codec error)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_codec import Recorder, response, server

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(lambda s: "x-" + s)
_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;,=/.", max_size=30).map(
    str.strip)


@st.composite
def _request(draw: Any) -> bytes:
    headers = draw(st.lists(st.tuples(_token, _value), max_size=6))
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    chunked = draw(st.booleans())
    lines = [b"POST /p?q=1 HTTP/1.1", b"Host: fuzz"] + [f"{k}: {v}".encode() for k, v in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % sum(map(len, chunks)))
        body = b"".join(chunks)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _normalized(rec: Recorder) -> list[tuple[Any, ...]]:
    """Events with the body joined (how it is cut into data events depends on the reads)."""
    out: list[tuple[Any, ...]] = []
    body = b""
    ended = False
    for event in rec.events:
        if event[0] == "data":
            body += event[1]
            ended = ended or event[2]
        else:
            out.append(event)
    return out + [("body", body, ended)]


def _feed(data: bytes, cuts: list[int]) -> Recorder:
    codec, rec = server()
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        codec.feed(data[last:cut])
        last = cut
    return rec


@settings(max_examples=200, deadline=None)
@given(data=_request(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_a_request_parses_the_same_however_it_is_split(data: bytes, cuts: list[int]) -> None:
    whole = _feed(data, [])
    assert "error" not in [e[0] for e in whole.events], whole.events
    assert _normalized(_feed(data, cuts)) == _normalized(whole)


@settings(max_examples=200, deadline=None)
@given(data=_request(), junk=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=10_000))
def test_junk_after_a_request_is_at_most_one_codec_error(data: bytes, junk: bytes, cut: int) -> None:
    codec, rec = server()
    stream = data + junk
    cut %= len(stream) + 1
    codec.feed(stream[:cut])
    codec.feed(stream[cut:])
    for _ in range(10):  # answer each request so pipelined ones are parsed too (bounded)
        if not codec.paused:
            break
        codec.encode_headers(response(200, ("content-length", "0")), True)
        codec.resume()
    kinds = [e[0] for e in rec.events]
    assert kinds.count("error") <= 1
    assert kinds[:2] == ["begin", "headers"]
