"""gRPC callouts of one worker (Envoy's Grpc::AsyncClient as the Wasm host uses it), over grpcio.

grpcio runs calls on its own threads and blocks while reading streams, so nothing here runs
grpcio on the worker's loop: a unary call completes through a future callback, a stream is
read by one daemon thread, and every result is handed to the worker with ``post`` (its
Dispatcher.post). Callbacks therefore always run on the worker thread, in order, and never
after the caller cancelled (the cancel happens on that thread too).

What a callout sees is shaped like Envoy 1.40's async client (checked live):

* a status from the server closes with its message followed by ``{via_upstream}`` (just
  ``via_upstream`` when the server sent none);
* a unary call starts once the VM call that made it has returned (one cancelled in that same
  VM call never reaches the server); a stream starts at once (its cancel reaches the server);
* a call whose ``timeout_ms`` passes ends with 14 ``upstream request timeout{response_timeout}``
  (the router's timeout beats the server's deadline); the server still gets the deadline;
* a refused connection ends with Envoy's local reply: 14 and ``upstream connect error or
  disconnect/reset before headers. reset reason: remote connection failure{...}``;
* a stream's response metadata is a header map: ``:status`` and ``content-type`` first, the
  server's metadata, and ``x-envoy-upstream-service-time`` when the request had ended before
  the headers came; trailing metadata starts with ``grpc-status`` / ``grpc-message``. A
  stream that ends without messages and with an error status is shown as Envoy shows a
  trailers-only response: empty initial metadata, then everything in the trailers. Headers
  without metadata are therefore delivered with the first message (or the end).

* an envoy_grpc request carries the router's ``x-envoy-internal: true`` and (with a timeout)
  ``x-envoy-expected-rq-timeout-ms``, and charges the cluster's request stats (`_RouterStats`).

A ``google_grpc`` service is shown as Envoy's Google gRPC client shows it (checked live): the
server's metadata only, messages without ``{via_upstream}``, and INTERNAL with no message for
an unreachable target or a timeout.

grpcio hides the transport headers it consumes, so ``grpc-accept-encoding`` (which
grpc-core servers send) is absent from the initial metadata; Envoy shows it. grpcio also
always sends its own ``user-agent`` (Envoy's envoy_grpc client sends none, or the plugin's).

Public API (worker thread): ``GrpcClient(post, timer_factory)``, ``.send(...) -> GrpcRequest``,
``.start(...) -> GrpcStream``, ``.close()``; see the callback protocols below.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import grpc

from ..http.headers import HeaderMap
from ..log import get_logger

__all__ = [
    "CONNECT_FAILURE_MESSAGE",
    "GrpcCallCallbacks",
    "GrpcClient",
    "GrpcRequest",
    "GrpcStream",
    "GrpcStreamCallbacks",
    "GrpcTarget",
    "remote_close_message",
]

_log = get_logger("wasm")

OK = 0
DEADLINE_EXCEEDED = 4
INTERNAL = 13
UNAVAILABLE = 14

# Envoy's local replies as its gRPC async client reports them (grpc-message, then the details).
CONNECT_FAILURE_MESSAGE = ("upstream connect error or disconnect/reset before headers. reset reason: "
                           "remote connection failure")
_CONNECT_FAILURE_DETAILS = "upstream_reset_before_response_started{remote_connection_failure}"
_CONNECT_REFUSED_DETAILS = ("upstream_reset_before_response_started{remote_connection_failure|"
                            "delayed_connect_error:_Connection_refused}")
TIMEOUT_MESSAGE = "upstream request timeout"
_TIMEOUT_DETAILS = "response_timeout"
_VIA_UPSTREAM = "via_upstream"

# Request metadata grpcio sets itself (or refuses): never passed through.
_RESERVED_METADATA = frozenset(("content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
                                "grpc-message-type", "host", "user-agent", "connection", "transfer-encoding"))

_ROUTER_METADATA = frozenset(("x-envoy-internal", "x-envoy-expected-rq-timeout-ms"))
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")

# Envoy connects afresh for each request; grpcio backs off after a failure unless told not to.
_CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _message(details: str, google: bool) -> str:
    """A server's status message as the plugin sees it (the Google client passes it as is)."""
    return details if google else remote_close_message(details)


def remote_close_message(message: str, details: str = _VIA_UPSTREAM) -> str:
    """The status message Envoy's async client reports: ``<grpc-message>{<details>}``."""
    return f"{message}{{{details}}}" if message else details


class GrpcCallCallbacks(Protocol):
    """Results of a unary call (Envoy's RawAsyncRequestCallbacks); worker thread."""

    def on_success(self, message: bytes) -> None: ...

    def on_failure(self, status: int, message: str) -> None: ...


class GrpcStreamCallbacks(Protocol):
    """Events of a stream (Envoy's RawAsyncStreamCallbacks); worker thread."""

    def on_receive_initial_metadata(self, metadata: HeaderMap) -> None: ...

    def on_receive_message(self, message: bytes) -> None: ...

    def on_receive_trailing_metadata(self, metadata: HeaderMap) -> None: ...

    def on_remote_close(self, status: int, message: str) -> None: ...


@dataclass(frozen=True)
class GrpcTarget:
    """Where a callout goes: a grpcio target (``host:port``), the :authority, extra metadata."""

    address: str
    authority: str
    metadata: tuple[tuple[str, str], ...] = ()
    #: google_grpc (Envoy's Google gRPC client, grpc-core like grpcio) instead of envoy_grpc
    #: (Envoy's own client over its router): results are shown as that client shows them.
    google: bool = False
    #: envoy_grpc: the cluster's ClusterStats on this worker, charged as Envoy's router does.
    stats: Any = field(default=None, compare=False)


class _RouterStats:
    """The cluster stats Envoy's router charges for an envoy_grpc callout (checked live); the
    connection stats are grpcio's business and not kept. ``upstream_rq_total`` counts a request
    that reached a connection: here once the server answered or the request was reset or timed
    out (Envoy counts it when the request starts, so an unanswered call shows up later)."""

    __slots__ = ("stats", "_counted")

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self._counted = False

    def started(self) -> None:
        if self.stats is not None and not self._counted:
            self._counted = True
            self.stats.inc("upstream_rq_total")

    def answered(self) -> None:
        """The server answered (any gRPC status): HTTP 200."""
        if self.stats is not None:
            self.started()
            self.stats.charge_response_code(200, True)

    def reset(self) -> None:
        """Cancelled by the plugin."""
        if self.stats is not None:
            self.started()
            self.stats.inc("upstream_rq_tx_reset")

    def timed_out(self) -> None:
        if self.stats is not None:
            self.started()
            self.stats.inc("upstream_rq_timeout")
            self.stats.inc("upstream_rq_tx_reset")
            self.stats.charge_response_code(504, True)

    def connect_failed(self) -> None:
        """No connection: the router's 503 (the request never counted as started)."""
        if self.stats is not None:
            self.stats.inc("upstream_cx_connect_fail")
            self.stats.inc("upstream_rq_pending_failure_eject")
            self.stats.charge_response_code(503, True)


def _status_code(code: grpc.StatusCode | None) -> int:
    return int(code.value[0]) if code is not None else 2  # UNKNOWN


def _is_connect_failure(code: int, details: str) -> bool:
    """grpcio's own failure for a host it could not reach or name (never a server's status)."""
    lowered = details.lower()
    return (code == UNAVAILABLE and "failed to connect" in lowered) or "failed to create channel" in lowered


def _connect_failure_details(details: str) -> str:
    return _CONNECT_REFUSED_DETAILS if "refused" in details.lower() else _CONNECT_FAILURE_DETAILS


def _metadata(target: GrpcTarget, metadata: HeaderMap, timeout_ms: int | None = None) -> list[tuple[str, str | bytes]]:
    """Call metadata grpcio accepts: the service's, then the plugin's (pseudo and transport
    headers and values grpcio refuses dropped; ``-bin`` values as bytes); for envoy_grpc,
    then what Envoy's router sets on its internal request (checked live)."""
    router: list[tuple[str, str]] = []
    if not target.google:
        router.append(("x-envoy-internal", "true"))
        if timeout_ms:
            router.append(("x-envoy-expected-rq-timeout-ms", str(timeout_ms)))
    out: list[tuple[str, str | bytes]] = []
    for key, value in (*target.metadata, *metadata.items(), *router):
        key = key.lower()
        if not _METADATA_KEY.fullmatch(key) or key in _RESERVED_METADATA:
            continue
        if not target.google and key in _ROUTER_METADATA and (key, value) not in router:
            continue  # the router's own value replaces the plugin's
        if key.endswith("-bin"):
            out.append((key, value.encode("latin-1")))
        elif _METADATA_VALUE.fullmatch(value):
            out.append((key, value))
        else:  # grpcio would fail the whole call ("Invalid metadata"); Envoy sends it as is
            _log.debug("gRPC callout: metadata %s dropped (not printable ASCII)", key)
    return out


def _metadata_pairs(metadata: Any) -> list[tuple[str, str]]:
    return [(k, v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in (metadata or ())]


class _Poster:
    """Hands a callable to the worker unless the worker has stopped (then drops it)."""

    __slots__ = ("_post",)

    def __init__(self, post: Callable[[Callable[[], None]], None]) -> None:
        self._post = post

    def __call__(self, cb: Callable[[], None]) -> None:
        try:
            self._post(cb)
        except RuntimeError:  # DispatcherExitedError: the worker is gone, nobody listens
            pass


class GrpcRequest:
    """An in-flight unary call (Envoy's Grpc::AsyncRequest); worker thread."""

    def __init__(self, client: GrpcClient, callbacks: GrpcCallCallbacks, timeout_ms: int | None,
                 target: GrpcTarget) -> None:
        self._callbacks = callbacks
        self._google = target.google
        self._stats = _RouterStats(target.stats)
        self._done = False
        self._future: Any = None
        self._timer: Any = None
        self._expired = timeout_ms == 0
        # grpcio's deadline ends the call at the timer's instant (minus scheduling slack).
        self._deadline = time.monotonic() + timeout_ms / 1000.0 - 0.005 if timeout_ms else None
        if timeout_ms:
            self._timer = client.timer_factory(self._on_timeout)
            self._timer.enable_timer(timeout_ms)

    def cancel(self) -> None:
        """No further callbacks; the server sees the call cancelled."""
        if self._finish():
            self._stats.reset()
        if self._future is not None:
            self._future.cancel()

    def _finish(self) -> bool:
        """Mark done; False if it already was."""
        if self._done:
            return False
        self._done = True
        if self._timer is not None:
            self._timer.disable_timer()
        return True

    def _on_timeout(self) -> None:
        if self._finish():
            if self._future is not None:
                self._future.cancel()
            self._timed_out()

    def _timed_out(self) -> None:
        self._stats.timed_out()
        if self._google:  # Envoy's Google client reports its own cancel as INTERNAL
            self._callbacks.on_failure(INTERNAL, "")
        else:
            self._callbacks.on_failure(UNAVAILABLE, remote_close_message(TIMEOUT_MESSAGE, _TIMEOUT_DETAILS))

    def _on_done(self, future: Any) -> None:
        if not self._finish():
            return
        if future.cancelled():  # cancelled by grpcio itself (channel closed)
            self._callbacks.on_failure(1, "cancelled")
            return
        code = _status_code(future.code())
        details = future.details() or ""
        if code == DEADLINE_EXCEEDED and self._deadline is not None and time.monotonic() >= self._deadline:
            # grpcio's own deadline (the same instant as the timer) lost the race in Envoy.
            self._timed_out()
        elif code == DEADLINE_EXCEEDED and self._expired:
            # Envoy sends grpc-timeout 0m and the server answers at once; grpcio fails locally.
            self._stats.answered()
            self._callbacks.on_failure(DEADLINE_EXCEEDED, _message("Deadline Exceeded", self._google))
        elif code == OK:
            self._stats.answered()
            self._callbacks.on_success(future.result())
        elif _is_connect_failure(code, details):
            self._stats.connect_failed()
            if self._google:
                self._callbacks.on_failure(INTERNAL, "")
            else:
                self._callbacks.on_failure(UNAVAILABLE, remote_close_message(CONNECT_FAILURE_MESSAGE,
                                                                             _connect_failure_details(details)))
        else:
            self._stats.answered()
            self._callbacks.on_failure(code, _message(details, self._google))


_END = object()  # the request iterator's end: half-close


class GrpcStream:
    """An in-flight stream (Envoy's Grpc::RawAsyncStream); worker thread."""

    def __init__(self, client: GrpcClient, callbacks: GrpcStreamCallbacks, target: GrpcTarget) -> None:
        self._callbacks = callbacks
        self._google = target.google
        self._stats = _RouterStats(target.stats)
        self._post = client.post
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._local_closed = False
        self._local_end_at: float | None = None  # monotonic time the request ended (reader reads it)
        self._done = False
        self._call: Any = None

    def _request_iterator(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not _END:
            yield item

    def send_message(self, message: bytes, end_stream: bool) -> None:
        if self._local_closed or self._done:
            return
        if message or not self._google:  # Envoy's Google client sends no empty message (checked live)
            self._requests.put(message)
        if end_stream:
            self.close_stream()

    def close_stream(self) -> None:
        """Half-close: the server sees the end of the requests."""
        if self._local_closed or self._done:
            return
        self._local_closed = True
        self._local_end_at = time.monotonic()
        self._requests.put(_END)

    def reset(self) -> None:
        """Cancel: no further callbacks; the server sees the stream cancelled."""
        if not self._done:
            self._stats.reset()
        self._done = True
        if self._call is not None:
            self._call.cancel()
        self._requests.put(_END)  # after the cancel: the server must not see a half-close

    # -- the reader thread ------------------------------------------------------------------

    def _service_time(self, at: float) -> list[tuple[str, str]]:
        """Worker thread: x-envoy-upstream-service-time, which the router adds when the request
        had ended. Envoy sends nothing before the VM call that opened the stream returns, so an
        end in that call always precedes the response: the check runs when the event reaches
        the worker, after that call."""
        end = self._local_end_at
        if end is None:
            return []
        return [("x-envoy-upstream-service-time", str(max(0, int((at - end) * 1000))))]

    def read(self) -> None:
        """Reader thread: wait for headers, messages and the status; post each event."""
        call = self._call
        metadata = _metadata_pairs(call.initial_metadata())
        headers_at = time.monotonic()
        # Envoy's own client shows the response headers; the Google client only the metadata.
        head = [] if self._google else [(":status", "200"), ("content-type", "application/grpc")]
        headers_sent = False
        # grpcio does not say whether headers came: with no metadata, wait for a message (headers
        # came) or the end (without messages and with an error: a trailers-only response).
        if metadata:
            self._deliver_initial([*head, *metadata], headers_at)
            headers_sent = True
        received = 0
        try:
            for message in call:
                if not headers_sent:
                    self._deliver_initial(head, headers_at)
                    headers_sent = True
                received += 1
                self._post(lambda m=message: self._deliver(lambda: self._callbacks.on_receive_message(m)))
        except grpc.RpcError:
            pass
        code = _status_code(call.code())
        details = call.details() or ""
        trailing = _metadata_pairs(call.trailing_metadata())
        if not headers_sent and code == OK and not received:
            self._deliver_initial(head, headers_at)
            headers_sent = True
        service_time_at: float | None = None  # set for a trailers-only response
        connect_failure = not headers_sent and _is_connect_failure(code, details)
        if self._google:
            if connect_failure:  # no metadata at all, INTERNAL without a message
                trailers, code, close_message = [], INTERNAL, ""
            else:
                if not headers_sent:
                    self._deliver_initial([], None)
                trailers, close_message = trailing, details
        elif headers_sent:
            trailers = [("grpc-status", str(code)), ("grpc-message", details), *trailing]
            close_message = remote_close_message(details)
        else:  # a trailers-only response (or Envoy's local reply for a connect failure)
            self._deliver_initial([], None)
            if connect_failure:
                trailers = [*head, ("grpc-status", str(UNAVAILABLE)), ("grpc-message", CONNECT_FAILURE_MESSAGE)]
                close_message = remote_close_message(CONNECT_FAILURE_MESSAGE, _connect_failure_details(details))
                code = UNAVAILABLE
            else:
                trailers = [*head, ("grpc-status", str(code)), ("grpc-message", details), *trailing]
                service_time_at = time.monotonic()
                close_message = remote_close_message(details)

        def close(code: int = code) -> None:
            if connect_failure:
                self._stats.connect_failed()
            else:
                self._stats.answered()
            extra = self._service_time(service_time_at) if service_time_at is not None else []
            self._callbacks.on_receive_trailing_metadata(HeaderMap([*trailers, *extra]))
            if not self._done:
                self._done = True
                self._callbacks.on_remote_close(code, close_message)

        self._post(lambda: self._deliver(close))

    def fail(self, status: int, message: str) -> None:
        """Any thread: end the stream with `status` unless it was reset first."""
        def close() -> None:
            if not self._done:
                self._done = True
                self._callbacks.on_remote_close(status, message)

        self._post(close)

    def _deliver_initial(self, pairs: list[tuple[str, str]], headers_at: float | None) -> None:
        def event() -> None:
            if pairs:  # response headers came: the request had a connection
                self._stats.started()
            extra = self._service_time(headers_at) if headers_at is not None and not self._google else []
            self._callbacks.on_receive_initial_metadata(HeaderMap([*pairs, *extra]))

        self._post(lambda: self._deliver(event))

    def _deliver(self, event: Callable[[], None]) -> None:
        """Worker thread: run event unless the stream was reset meanwhile."""
        if not self._done:
            event()


class GrpcClient:
    """One worker's gRPC callouts: grpcio channels by target, results posted to the worker."""

    def __init__(self, post: Callable[[Callable[[], None]], None], timer_factory: Callable[[Callable[[], None]], Any]
                 ) -> None:
        self.post = _Poster(post)
        self.timer_factory = timer_factory
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._lock = threading.Lock()

    def _channel(self, target: GrpcTarget) -> grpc.Channel:
        key = (target.address, target.authority)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                options = _CHANNEL_OPTIONS + ((("grpc.default_authority", target.authority),)
                                              if target.authority else ())
                channel = self._channels[key] = grpc.insecure_channel(target.address, options=options)
            return channel

    def send(self, target: GrpcTarget, service: str, method: str, metadata: HeaderMap, request: bytes,
             timeout_ms: int | None, callbacks: GrpcCallCallbacks) -> GrpcRequest:
        """Start a unary call; ``timeout_ms`` None: no timeout, 0: an already expired deadline."""
        call = GrpcRequest(self, callbacks, timeout_ms, target)
        # Envoy sends nothing before the VM call returns, and a call cancelled by then never
        # reaches the server (checked live): start it from the worker's next drain.
        self.post(lambda: self._send(call, target, service, method, metadata, request, timeout_ms))
        return call

    def _send(self, call: GrpcRequest, target: GrpcTarget, service: str, method: str, metadata: HeaderMap,
              request: bytes, timeout_ms: int | None) -> None:
        if call._done:
            return
        path = f"/{service}/{method}"
        timeout = None if timeout_ms is None else timeout_ms / 1000.0
        try:
            if target.google and not request:
                # Envoy's Google client sends no message for an empty request (checked live).
                future = self._channel(target).stream_unary(path).future(
                    iter(()), timeout=timeout, metadata=_metadata(target, metadata, timeout_ms))
            else:
                future = self._channel(target).unary_unary(path).future(
                    request, timeout=timeout, metadata=_metadata(target, metadata, timeout_ms))
        except (ValueError, TypeError) as e:  # metadata grpcio refuses
            _log.debug("gRPC callout %s/%s not started: %s", service, method, e)
            call._on_done(_FailedFuture(13, str(e)))
            return
        call._future = future
        future.add_done_callback(lambda f: self.post(lambda: call._on_done(f)))

    def start(self, target: GrpcTarget, service: str, method: str, metadata: HeaderMap,
              callbacks: GrpcStreamCallbacks) -> GrpcStream:
        """Open a bidirectional stream; messages go with send_message, the end with close_stream."""
        stream = GrpcStream(self, callbacks, target)
        multicallable = self._channel(target).stream_stream(f"/{service}/{method}")
        try:
            stream._call = multicallable(stream._request_iterator(), metadata=_metadata(target, metadata))
        except (ValueError, TypeError) as e:  # metadata grpcio refuses
            _log.debug("gRPC callout stream %s/%s not started: %s", service, method, e)
            stream.fail(13, str(e))
            return stream
        threading.Thread(target=stream.read, name="grpc-callout-reader", daemon=True).start()
        return stream

    def close(self) -> None:
        """Close every channel (in-flight callouts end, their results are dropped)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class _FailedFuture:
    """A call grpcio refused to start, shaped like its future."""

    def __init__(self, code: int, details: str) -> None:
        self._code = next(c for c in grpc.StatusCode if c.value[0] == code)
        self._details = details

    def cancelled(self) -> bool:
        return False

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
