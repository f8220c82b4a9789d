"""HTTP/1.1 connection pool for one host on one worker (Envoy's http1 ConnPoolImpl).

One request per connection at a time; a connection whose response completed
cleanly (keep-alive, request fully sent) goes back to the ready list and serves
the next pending request. `new_stream` either attaches at once to a ready
connection or queues the request and, if no connecting connection will serve it,
opens a new one, within the cluster's circuit breakers.

Worker thread only. The sockets are asyncio transports on the worker's loop; the
HTTP/1 framing is the sans-IO `ClientCodec`.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ..http.codec import ClientCodec, CodecError
from ..http.headers import HeaderMap
from ..http.stream_info import Address

if TYPE_CHECKING:
    from .cluster import ClusterInfo
    from .cluster_stats import ClusterStats
    from .host import Host


class StreamResetReason(enum.Enum):
    """Http::StreamResetReason, with Envoy's resetReasonToString texts."""

    LocalConnectionFailure = "local connection failure"
    RemoteConnectionFailure = "remote connection failure"
    ConnectionTimeout = "connection timeout"
    ConnectionTermination = "connection termination"
    LocalReset = "local reset"
    Overflow = "overflow"
    ProtocolError = "protocol error"


class PoolFailureReason(enum.Enum):
    Overflow = "overflow"
    LocalConnectionFailure = "local connection failure"
    RemoteConnectionFailure = "remote connection failure"
    Timeout = "timeout"


# How the router reports a pool failure (Router::Filter::onPoolFailure).
POOL_FAILURE_TO_RESET = {
    PoolFailureReason.Overflow: StreamResetReason.Overflow,
    PoolFailureReason.LocalConnectionFailure: StreamResetReason.LocalConnectionFailure,
    PoolFailureReason.RemoteConnectionFailure: StreamResetReason.RemoteConnectionFailure,
    PoolFailureReason.Timeout: StreamResetReason.ConnectionTimeout,
}


class ResponseDecoder(Protocol):
    """Receives the upstream response of one stream (Envoy's ResponseDecoder + StreamCallbacks)."""

    def decode_1xx_headers(self, headers: HeaderMap) -> None: ...

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...

    def decode_data(self, data: bytes, end_stream: bool) -> None: ...

    def decode_trailers(self, trailers: HeaderMap) -> None: ...

    def on_reset_stream(self, reason: StreamResetReason, details: str) -> None: ...

    def on_above_write_buffer_high_watermark(self) -> None: ...

    def on_below_write_buffer_low_watermark(self) -> None: ...


class PoolCallbacks(Protocol):
    def on_pool_ready(self, encoder: "RequestEncoder", host: "Host") -> None: ...

    def on_pool_failure(self, reason: PoolFailureReason, transport_failure_reason: str, host: "Host") -> None: ...


class PendingStream:
    """A queued request waiting for a connection; `cancel()` withdraws it."""

    __slots__ = ("pool", "decoder", "callbacks")

    def __init__(self, pool: "Http1ConnPool", decoder: ResponseDecoder, callbacks: PoolCallbacks) -> None:
        self.pool = pool
        self.decoder = decoder
        self.callbacks = callbacks

    def cancel(self) -> None:
        self.pool._remove_pending(self)


class RequestEncoder:
    """The request side of one stream on an ActiveClient (Envoy's RequestEncoder + Stream)."""

    __slots__ = ("_client", "decoder", "request_complete", "response_complete", "done")

    def __init__(self, client: "ActiveClient", decoder: ResponseDecoder) -> None:
        self._client = client
        self.decoder = decoder
        self.request_complete = False
        self.response_complete = False
        self.done = False

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.request_complete = end_stream
        self._client.write(self._client.codec.encode_request_headers(headers, end_stream))

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.request_complete = end_stream
        out = self._client.codec.encode_data(data, end_stream)
        if out:
            self._client.write(out)

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.request_complete = True
        out = self._client.codec.encode_trailers(trailers)
        if out:
            self._client.write(out)

    def reset_stream(self) -> None:
        """Abandon the stream: HTTP/1 cannot cancel a request, so the connection is closed."""
        if not self.done:
            self.done = True
            self._client.on_stream_reset_locally()

    def read_disable(self, disable: bool) -> None:
        self._client.read_disable(disable)

    @property
    def connection_id(self) -> int:
        return self._client.id

    @property
    def local_address(self) -> Address | None:
        """The upstream connection's local address (StreamInfo upstream_local_address), read
        from the socket once per connection."""
        client = self._client
        address = client.local_address
        if address is None:
            transport = client.transport
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            address = client.local_address = Address(sockname[0], sockname[1]) if sockname else None
        return address


_next_client_id = 0
# Envoy's HTTP/1 codec counters in the cluster's scope (cluster.<name>.http1.*).
_HTTP1_CODEC_COUNTERS = ("http1.dropped_headers_with_underscores", "http1.metadata_not_supported_error",
                         "http1.requests_rejected_with_underscores_in_headers", "http1.response_flood")


class ActiveClient(asyncio.Protocol):
    """One upstream connection: connect, write requests, feed responses to the codec."""

    def __init__(self, pool: "Http1ConnPool") -> None:
        global _next_client_id
        _next_client_id += 1
        self.id = _next_client_id
        self.pool = pool
        self.codec = ClientCodec(self, enable_trailers=pool.info.enable_trailers)
        for name in _HTTP1_CODEC_COUNTERS:  # Envoy makes them with the cluster's first HTTP/1 codec
            pool.stats.inc(name, 0)
        self.transport: asyncio.Transport | None = None
        self.local_address: Address | None = None  # cached by RequestEncoder.local_address
        self.stream: RequestEncoder | None = None
        self.state = "connecting"  # connecting -> ready/busy -> closed
        self.remaining_requests = pool.info.max_requests_per_connection or -1
        self.requests = 0
        self.drain_after_stream = False
        self._eof = False
        # Response bytes received for the current stream: a close after some is a protocol
        # error (an incomplete message), a close before any is a connection termination.
        self._response_bytes = 0
        self._read_disable_count = 0
        self.created_at = self._connect_start = pool.dispatcher.time_source.monotonic()
        self._connect_timer = pool.dispatcher.create_timer(self._on_connect_timeout)
        self._idle_timer: Any = None
        self._task: asyncio.Future[Any] | None = None

    # -- connecting -------------------------------------------------------------------------

    def connect(self) -> None:
        addr = self.pool.host.address
        loop = self.pool.dispatcher.loop
        self._task = loop.create_task(loop.create_connection(lambda: self, addr.host, addr.port))
        self._task.add_done_callback(self._on_connect_done)
        self._connect_timer.enable_timer(self.pool.info.connect_timeout_ms)

    def _on_connect_done(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or self.state != "connecting":
            return
        exc = task.exception()
        if exc is not None:
            self._connect_timer.disable_timer()
            local = isinstance(exc, OSError) and exc.errno in (errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE)
            self.state = "closed"
            # Envoy's transport failure reason for a plain TCP connect error.
            code = getattr(exc, "errno", None)
            reason = f"delayed connect error: {os.strerror(code)}" if isinstance(code, int) else ""
            self.pool._on_connect_failure(
                self,
                PoolFailureReason.LocalConnectionFailure if local else PoolFailureReason.RemoteConnectionFailure,
                reason,
            )

    def _on_connect_timeout(self) -> None:
        if self.state != "connecting":
            return
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()
        self.pool.stats.inc("upstream_cx_connect_timeout")
        self.pool._on_connect_failure(self, PoolFailureReason.Timeout, "")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        if self.state != "connecting":  # timed out meanwhile
            transport.abort()
            return
        self._connect_timer.disable_timer()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        limit = self.pool.info.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        now = self.pool.dispatcher.time_source.monotonic()
        self.pool.stats.record_ms("upstream_cx_connect_ms", (now - self._connect_start) * 1000)
        self.state = "ready"
        self.pool._on_client_ready(self)

    # -- streams ----------------------------------------------------------------------------

    def new_stream(self, decoder: ResponseDecoder) -> RequestEncoder:
        assert self.state == "ready" and self.stream is None
        # The idle timer stays armed while busy: it closes only a "ready" connection, and
        # going ready again re-arms it (a later deadline costs the Timer no re-scheduling).
        self.state = "busy"
        if self.remaining_requests > 0:
            self.remaining_requests -= 1
        self._response_bytes = 0
        self.requests += 1
        self.stream = RequestEncoder(self, decoder)
        return self.stream

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            counter = self.pool.tx_bytes_total  # Counter.inc, inline
            counter.value += len(data)
            counter.used = True
            transport.write(data)

    def read_disable(self, disable: bool) -> None:
        self._read_disable_count += 1 if disable else -1
        if self.transport is None or self.transport.is_closing():
            return
        if disable and self._read_disable_count == 1:
            self.transport.pause_reading()
        elif not disable and self._read_disable_count == 0:
            self.transport.resume_reading()

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        n = len(data)
        counter = self.pool.rx_bytes_total  # Counter.inc, inline
        counter.value += n
        counter.used = True
        if self.stream is None or self.stream.done:
            # Bytes with no request outstanding: the connection is unusable (Envoy closes it).
            self.close(local=False)
            return
        self._response_bytes += n
        self.codec.feed(data)

    def eof_received(self) -> bool:
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "closed":
            return  # closed by us: already accounted for
        if self.state == "connecting":
            self.state = "closed"
            return  # the connect task reports the failure
        self._on_closed(local=False)

    def pause_writing(self) -> None:
        if self.stream is not None and not self.stream.done:
            self.stream.decoder.on_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        if self.stream is not None and not self.stream.done:
            self.stream.decoder.on_below_write_buffer_low_watermark()

    # -- ClientCodec callbacks -------------------------------------------------------------------------

    def on_1xx(self, headers: HeaderMap) -> None:
        if self.stream is not None and not self.stream.done:
            self.stream.decoder.decode_1xx_headers(headers)

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        stream = self.stream
        if stream is None or stream.done:
            return
        index = headers.first_values
        if "connection" in index and index["connection"].lower() == "close":
            self.pool.stats.inc("upstream_cx_close_notify")
        if end_stream:
            self._complete(stream)
        stream.decoder.decode_headers(headers, end_stream)
        if end_stream:
            self._after_response()

    def on_data(self, data: bytes, end_stream: bool) -> None:
        stream = self.stream
        if stream is None or stream.done:
            return
        if end_stream:
            stream.response_complete = True  # _complete and _finish_stream, inline
            if not stream.done:
                stream.done = True
                pool = self.pool  # pool._on_stream_done(self), inline
                pool._rm.requests.dec()
                gauge = pool._rq_active
                gauge.value -= 1
                gauge.used = True
                pool.host.stats.rq_active -= 1
        stream.decoder.decode_data(data, end_stream)
        if end_stream:
            self._after_response()

    def on_trailers(self, trailers: HeaderMap) -> None:
        stream = self.stream
        if stream is None or stream.done:
            return
        self._complete(stream)
        stream.decoder.decode_trailers(trailers)
        self._after_response()

    def on_codec_error(self, error: CodecError) -> None:
        stream = self.stream
        if stream is None or stream.done:
            return
        self._finish_stream(stream)
        self.close(local=not self._eof)
        terminated = self._eof and self._response_bytes == 0
        reason = StreamResetReason.ConnectionTermination if terminated else StreamResetReason.ProtocolError
        stream.decoder.on_reset_stream(reason, error.details)

    # -- lifecycle ---------------------------------------------------------------------------

    def _complete(self, stream: RequestEncoder) -> None:
        stream.response_complete = True
        self._finish_stream(stream)

    def _finish_stream(self, stream: RequestEncoder) -> None:
        if not stream.done:
            stream.done = True
            self.pool._on_stream_done(self)

    def _after_response(self) -> None:
        """Reuse the connection only when both directions ended cleanly."""
        stream = self.stream
        self.stream = None
        if stream is not None:
            # The response is delivered: nothing calls the decoder any more, and dropping it
            # breaks the RequestEncoder <-> decoder (the router's UpstreamRequest) cycle, so the
            # stream is freed by refcount, not left to the cyclic gc.
            stream.decoder = None  # type: ignore[assignment]
        if self.state != "busy":
            return
        if stream is None or not stream.request_complete or not self.codec.keep_alive or self._eof:
            self.close(local=True)
            return
        if self.remaining_requests == 0:
            self.pool.stats.inc("upstream_cx_max_requests")
            self.close(local=True)
            return
        self.state = "ready"
        self.pool._on_client_ready(self)

    def on_stream_reset_locally(self) -> None:
        self.pool._on_stream_done(self)
        self.close(local=True)

    def start_idle_timer(self, ms: int) -> None:
        if self._idle_timer is None:
            self._idle_timer = self.pool.dispatcher.create_timer(self._on_idle_timeout)
        self._idle_timer.enable_timer(ms)

    def _on_idle_timeout(self) -> None:
        if self.state == "ready":
            self.pool.stats.inc("upstream_cx_idle_timeout")
            self.close(local=True)

    def close(self, local: bool) -> None:
        """Close now (no flush) and account for it at once, as Envoy's close event does."""
        if self.transport is None or self.state in ("closed", "connecting"):
            return
        self.transport.abort()
        self._on_closed(local)

    def _on_closed(self, local: bool) -> None:
        self.state = "closed"
        self._connect_timer.disable_timer()
        if self._idle_timer is not None:
            self._idle_timer.disable_timer()
        stream, self.stream = self.stream, None
        if stream is not None and not stream.done:
            if not local:
                self._eof = True
                self.stream = stream
                self.codec.feed_eof()  # ends a close-delimited body, or reports the termination
                self.stream = None
            if not stream.done:
                self._finish_stream(stream)
                stream.decoder.on_reset_stream(StreamResetReason.ConnectionTermination, "")
        with_active_rq = stream is not None and not stream.response_complete
        self.pool._on_client_closed(self, local, with_active_rq)


class Http1ConnPool:
    """Connections to one host from one worker."""

    def __init__(self, dispatcher: Any, host: "Host", info: "ClusterInfo", stats: "ClusterStats") -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.info = info
        self.stats = stats
        self._rm = info.resource_manager
        # Hot counters, bound once (ThreadLocalCluster declared them: binding creates nothing new).
        self.tx_bytes_total = stats.counter("upstream_cx_tx_bytes_total")
        self.rx_bytes_total = stats.counter("upstream_cx_rx_bytes_total")
        self._rq_total = stats.counter("upstream_rq_total")
        self._rq_active = stats.gauge("upstream_rq_active")
        self._ready: list[ActiveClient] = []
        self._busy: set[ActiveClient] = set()
        self._connecting: list[ActiveClient] = []
        self._pending: deque[PendingStream] = deque()
        self._draining = False

    # -- public --------------------------------------------------------------------------

    def new_stream(self, decoder: ResponseDecoder, callbacks: PoolCallbacks) -> PendingStream | None:
        """Attach now (on_pool_ready before returning None) or queue; None also after a failure."""
        if self._ready:
            client = self._ready.pop()
            self._attach(client, decoder, callbacks)
            return None
        if not self._rm.pending_requests.can_create():
            self.stats.inc("upstream_rq_pending_overflow")
            callbacks.on_pool_failure(PoolFailureReason.Overflow, "", self.host)
            return None
        pending = PendingStream(self, decoder, callbacks)
        self._pending.append(pending)
        self._rm.pending_requests.inc()
        self.stats.inc("upstream_rq_pending_total")
        self.stats.gauge_add("upstream_rq_pending_active", 1)
        self.host.stats.rq_pending_active += 1
        self._try_create_connections()
        return pending

    def drain_connections(self) -> None:
        """Close idle connections now and busy ones when their stream ends."""
        self._draining = True
        for client in list(self._ready):
            client.close(local=True)

    def drain_existing_connections(self) -> None:
        """Close idle connections now and busy ones after their stream; new ones may still open."""
        for client in list(self._ready):
            client.close(local=True)
        for client in self._busy:
            client.drain_after_stream = True

    def has_active_connections(self) -> bool:
        return bool(self._busy or self._connecting or self._pending)

    @property
    def connection_count(self) -> int:
        return len(self._ready) + len(self._busy) + len(self._connecting)

    # -- internals --------------------------------------------------------------------------

    def _try_create_connections(self) -> None:
        while len(self._connecting) < len(self._pending):
            if not self._rm.connections.can_create():
                self.stats.inc("upstream_cx_overflow")
                # Envoy still opens one when this host has none at all, so the queue can drain.
                if self._ready or self._busy or self._connecting:
                    return
            self._create_client()

    def _create_client(self) -> None:
        client = ActiveClient(self)
        self._connecting.append(client)
        self._rm.connections.inc()
        self.stats.inc("upstream_cx_total")
        self.stats.inc("upstream_cx_http1_total")
        self.stats.gauge_add("upstream_cx_active", 1)
        self.host.stats.cx_total += 1
        self.host.stats.cx_active += 1
        client.connect()

    def _pop_pending(self) -> PendingStream:
        pending = self._pending.popleft()
        self._pending_gone()
        return pending

    def _pending_gone(self) -> None:
        self._rm.pending_requests.dec()
        self.stats.gauge_add("upstream_rq_pending_active", -1)
        self.host.stats.rq_pending_active -= 1

    def _remove_pending(self, pending: PendingStream) -> None:
        try:
            self._pending.remove(pending)
        except ValueError:
            return
        self._pending_gone()
        self.stats.inc("upstream_rq_cancelled")

    def _attach(self, client: ActiveClient, decoder: ResponseDecoder, callbacks: PoolCallbacks) -> None:
        if not self._rm.requests.can_create():
            self.stats.inc("upstream_rq_pending_overflow")
            self._on_client_ready(client, attach=False)
            callbacks.on_pool_failure(PoolFailureReason.Overflow, "", self.host)
            return
        self._busy.add(client)
        self._rm.requests.inc()
        # _rq_total.inc() and _rq_active.inc(), inline.
        counter = self._rq_total
        counter.value += 1
        counter.used = True
        gauge = self._rq_active
        gauge.value += 1
        gauge.used = True
        host_stats = self.host.stats
        host_stats.rq_total += 1
        host_stats.rq_active += 1
        encoder = client.new_stream(decoder)
        callbacks.on_pool_ready(encoder, self.host)

    def _on_client_ready(self, client: ActiveClient, attach: bool = True) -> None:
        if client in self._connecting:
            self._connecting.remove(client)
        self._busy.discard(client)
        if self._draining or client.drain_after_stream:
            client.close(local=True)
            return
        if attach and self._pending:
            pending = self._pop_pending()
            self._attach(client, pending.decoder, pending.callbacks)
            return
        self._ready.append(client)
        idle_ms = self.info.idle_timeout_ms
        if idle_ms > 0:  # 0 disables it, as in Envoy
            timer = client._idle_timer
            if timer is not None:
                timer.enable_timer(idle_ms)  # start_idle_timer, inline once the timer exists
            else:
                client.start_idle_timer(idle_ms)

    def _remove_ready(self, client: ActiveClient) -> None:
        if client in self._ready:
            self._ready.remove(client)

    def _on_stream_done(self, client: ActiveClient) -> None:
        # (ActiveClient.on_data does the same inline for a response's last body chunk.)
        self._rm.requests.dec()
        gauge = self._rq_active  # Gauge.dec, inline
        gauge.value -= 1
        gauge.used = True
        self.host.stats.rq_active -= 1

    def _on_connect_failure(self, client: ActiveClient, reason: PoolFailureReason, transport_failure: str) -> None:
        if client in self._connecting:
            self._connecting.remove(client)
        self._record_length(client)
        self.stats.inc("upstream_cx_connect_fail")
        self.host.stats.cx_connect_fail += 1
        self._connection_gone(local=False, with_active_rq=False)
        # Pending requests this failure leaves without a connecting client fail now.
        while len(self._pending) > len(self._connecting):
            pending = self._pending.pop()
            self._pending_gone()
            self.stats.inc("upstream_rq_pending_failure_eject")
            pending.callbacks.on_pool_failure(reason, transport_failure, self.host)

    def _on_client_closed(self, client: ActiveClient, local: bool, with_active_rq: bool) -> None:
        self._record_length(client)
        self.stats.record("upstream_rq_per_cx", client.requests)
        self._remove_ready(client)
        self._busy.discard(client)
        self._connection_gone(local, with_active_rq)
        if self._pending:
            self._try_create_connections()

    def _record_length(self, client: ActiveClient) -> None:
        now = self.dispatcher.time_source.monotonic()
        self.stats.record_ms("upstream_cx_length_ms", (now - client.created_at) * 1000)

    def _connection_gone(self, local: bool, with_active_rq: bool) -> None:
        self._rm.connections.dec()
        self.stats.gauge_add("upstream_cx_active", -1)
        self.host.stats.cx_active -= 1
        self.stats.inc("upstream_cx_destroy")
        side = "local" if local else "remote"
        self.stats.inc(f"upstream_cx_destroy_{side}")
        if with_active_rq:
            self.stats.inc("upstream_cx_destroy_with_active_rq")
            self.stats.inc(f"upstream_cx_destroy_{side}_with_active_rq")
