"""A finished stream is freed by reference counting (ActiveStream.release), not left to the cyclic gc,
and releasing never happens while the stream is still on the stack."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from wasmproxy.http.filter import FilterHeadersStatus, PassThroughFilter

from tests.test_conn_manager import Direct, Harness


class _Refs:
    """A filter factory that keeps weak references to each stream's filter manager and stream."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []

    def __call__(self, callbacks: Any) -> None:
        self.refs += [weakref.ref(callbacks), weakref.ref(callbacks.callbacks)]
        callbacks.add_stream_filter(Direct())


def test_a_completed_stream_is_freed_without_the_cyclic_gc():
    h = Harness()
    factory = _Refs()
    h.config.filter_factories = [factory]
    conn, t = h.connect()
    gc.disable()
    try:
        for _ in range(2):
            conn.data_received(b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n")
            h.dispatcher.run_posts()
        assert t.take().count(b"HTTP/1.1 200 OK") == 2
        assert len(factory.refs) == 4
        assert [r() for r in factory.refs] == [None] * 4
    finally:
        gc.enable()


class _ReplyThenReset(PassThroughFilter):
    """Prepares a local reply, then resets, in one decode_headers callback."""

    encoded: list[str | None]

    def __init__(self) -> None:
        self.encoded = []

    def decode_headers(self, headers, end_stream):
        self.decoder_callbacks.send_local_reply(403, "no")
        self.decoder_callbacks.reset_stream()
        return FilterHeadersStatus.StopIteration

    def encode_headers(self, headers, end_stream):
        self.encoded.append(headers.get(":status"))
        return FilterHeadersStatus.Continue


def test_a_reply_prepared_before_a_reset_still_runs_through_the_encoder_filters():
    # The stream is destroyed inside the filter's callback; the prepared reply runs after it
    # returns, on the destroyed stream, exactly as before streams were released.
    h = Harness(_ReplyThenReset)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.dispatcher.run_posts()
    assert [f.encoded for f in h.made] == [["403"]]
    assert h.store["downstream_rq_4xx"] == 1
    assert h.store["downstream_rq_tx_reset"] == 1
    assert t.take() == b""
