"""The router filter (envoy.filters.http.router): the terminal decoder filter that proxies upstream.

Per stream: take the route the connection manager selected, answer direct
responses and redirects, pick the cluster and a host, get a stream from that
host's HTTP/1 pool, send the request (buffering until the connection is ready),
and stream the response back through the decoder callbacks' encode_* methods.
Failures become Envoy's local replies, with Envoy's bodies, details and flags:

* no route: 404, empty body, NR;  unknown cluster: cluster_not_found_response_code, NC;
* no host: 503 "no healthy upstream", UH;  route timeout: 504 "upstream request timeout", UT;
* connect failure / reset before headers: 503 (502 for a protocol error)
  "upstream connect error or disconnect/reset before headers. reset reason: <reason>", UF/UC/UO
  ("retried and the latest reset reason: ..." after retries, flags URX,UF).

Retries follow the route's (or virtual host's) retry_policy: the request body is kept
for replay up to the cluster's buffer limit, each retry backs off with jitter, and a
response Envoy would retry is discarded (counted under `retry.`) unless retries ran out.

Worker thread only (the stream's dispatcher).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, AbstractSet, Any, Callable

from ..http.filter import (
    FilterDataStatus,
    FilterFactoryCb,
    FilterHeadersStatus,
    FilterTrailersStatus,
    StreamDecoderFilterCallbacks,
)
from ..http.headers import HeaderMap
from ..upstream.conn_pool import POOL_FAILURE_TO_RESET, PoolFailureReason, RequestEncoder, StreamResetReason
from .config import shadow_authority, update_authority
from .retry import RetryState

if TYPE_CHECKING:
    from ..upstream.cluster_manager import ThreadLocalCluster, ThreadLocalClusterManager
    from ..upstream.host import Host
    from .config import Route

RESET_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. "
NO_HEALTHY_UPSTREAM = "no healthy upstream"
UPSTREAM_REQUEST_TIMEOUT = "upstream request timeout"

# StreamInfo::ResponseCodeDetails values.
DETAILS_ROUTE_NOT_FOUND = "route_not_found"
DETAILS_CLUSTER_NOT_FOUND = "cluster_not_found"
DETAILS_NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
DETAILS_RESPONSE_TIMEOUT = "response_timeout"
DETAILS_DIRECT_RESPONSE = "direct_response"
DETAILS_VIA_UPSTREAM = "via_upstream"

# Router's streamResetReasonToResponseFlag.
_RESET_FLAGS = {
    StreamResetReason.LocalConnectionFailure: "UF",
    StreamResetReason.RemoteConnectionFailure: "UF",
    StreamResetReason.ConnectionTimeout: "UF",
    StreamResetReason.ConnectionTermination: "UC",
    StreamResetReason.LocalReset: "LR",
    StreamResetReason.Overflow: "UO",
    StreamResetReason.ProtocolError: "UPE",
}

# Hop-by-hop headers that describe one HTTP/1 connection, never forwarded to the next hop.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding"))

# The request headers the router reads and consumes (the x-envoy-internal flag, finalTimeout's
# and the retry state's); one set operation tells which are present, so a request without any
# costs no lookups.
_CONTROL_HEADERS = frozenset((
    "x-envoy-internal", "x-envoy-expected-rq-timeout-ms", "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-retry-on", "x-envoy-max-retries",
))


def remove_hop_by_hop(headers: HeaderMap) -> None:
    for name in headers.names() & _HOP_BY_HOP:  # usually none
        headers.remove(name)


# Envoy's ALL_ROUTER_STATS that wasmproxy can reach, under http.<hcm stat_prefix>.
ROUTER_STATS = ("no_route", "no_cluster", "rq_redirect", "rq_direct_response", "rq_total",
                "rq_reset_after_downstream_response_started")


class _IgnoreResponse:
    """AsyncClient callbacks of a shadow request: its answer is dropped, as Envoy's shadow writer does."""

    def on_success(self, headers: HeaderMap, body: bytes, trailers: HeaderMap | None) -> None:
        pass

    def on_failure(self, reason: str) -> None:
        pass


_IGNORE_RESPONSE = _IgnoreResponse()


class RouterStats:
    """One worker's router counters (Store objects resolved once)."""

    __slots__ = ROUTER_STATS

    def __init__(self, store: Any, prefix: str) -> None:
        for name in ROUTER_STATS:
            setattr(self, name, store.counter(prefix + name))


_second = operator.itemgetter(1)


def check_request_headers(headers: HeaderMap) -> str:
    """What Envoy's HTTP/1 request encoder refuses (checkRequiredRequestHeaders and
    checkValidRequestHeaders), as its error message; "" when the request can be sent."""
    index = headers.first_values
    if ":method" in index and (":path" in index or index[":method"] == "CONNECT"):
        # The usual case without a Python step per header: no value has a CR, LF or NUL.
        values = "".join(map(_second, headers._entries))
        if "\r" not in values and "\n" not in values and "\x00" not in values:
            return ""
    method: str | None = None
    has_path = False
    invalid: str | None = None
    for key, value in headers._entries:  # one pass, judged in Envoy's order below
        if key == ":method":
            if method is None:
                method = value
        elif key == ":path":
            has_path = True
        if invalid is None and ("\r" in value or "\n" in value or "\x00" in value):
            invalid = key
    if method is None:
        return "missing required header: :method"
    if method != "CONNECT" and not has_path:
        return "missing required header: :path"
    if invalid is not None:
        return f"invalid header value for: {invalid}"
    return ""


# Response timers a worker keeps for reuse (per router config), at most.
MAX_IDLE_RESPONSE_TIMERS = 256


class ResponseTimer:
    """The route (global) timeout timer of one stream at a time: a worker's streams take turns
    with a few of them, since re-arming a Timer costs a fraction of creating one and its loop
    timer for every request (~0.3 vs ~1.7 us)."""

    __slots__ = ("router", "timer")

    def __init__(self, dispatcher: Any) -> None:
        self.router: Router | None = None  # the stream it times, while armed
        self.timer = dispatcher.create_timer(self._on_response_timeout)

    def _on_response_timeout(self) -> None:
        router = self.router
        if router is not None:
            router._on_response_timeout()


class RouterWorker:
    """What a RouterConfig's streams on one worker share: its router counters (None without a
    stat prefix), that thread's ThreadLocalClusterManager (resolved on first use) and the
    response timers not in use."""

    __slots__ = ("dispatcher", "stats", "cluster_manager", "_idle_response_timers")

    def __init__(self, dispatcher: Any, stats: RouterStats | None) -> None:
        self.dispatcher = dispatcher
        self.stats = stats
        self.cluster_manager: ThreadLocalClusterManager | None = None
        self._idle_response_timers: list[ResponseTimer] = []

    def arm_response_timer(self, router: Router, ms: int) -> ResponseTimer:
        """A response timer for `router`, firing its _on_response_timeout after `ms`."""
        idle = self._idle_response_timers
        timer = idle.pop() if idle else ResponseTimer(self.dispatcher)
        timer.router = router
        timer.timer.enable_timer(ms)
        return timer

    def release_response_timer(self, timer: ResponseTimer) -> None:
        """Disarm a timer from arm_response_timer (fired or not) and keep it for another stream."""
        timer.timer.disable_timer()
        timer.router = None
        idle = self._idle_response_timers
        if len(idle) < MAX_IDLE_RESPONSE_TIMERS:  # a burst of streams leaves no lasting pile
            idle.append(timer)


class RouterConfig:
    """envoy.extensions.filters.http.router.v3.Router plus the cluster manager it routes to.

    With `stat_prefix` ("http.<hcm stat_prefix>.") and `store_for(dispatcher)`, the router
    counts Envoy's router stats in the stream's worker Store.
    """

    def __init__(
        self,
        proto: Any,
        thread_local_cluster_manager: Callable[[], "ThreadLocalClusterManager"],
        stat_prefix: str | None = None,
        store_for: Callable[[Any], Any] | None = None,
    ) -> None:
        # Called on the stream's worker: that thread's ThreadLocalClusterManager.
        self.thread_local_cluster_manager = thread_local_cluster_manager
        self.suppress_envoy_headers: bool = bool(proto is not None and proto.suppress_envoy_headers)
        self.respect_expected_rq_timeout: bool = bool(proto is not None and proto.respect_expected_rq_timeout)
        self._stat_prefix = stat_prefix
        self._store_for = store_for
        self._stats: dict[int, RouterStats] = {}  # id(dispatcher) -> that worker's counters
        self._workers: dict[int, RouterWorker] = {}  # id(dispatcher) -> RouterWorker

    def worker(self, dispatcher: Any) -> RouterWorker:
        """The calling worker's RouterWorker (`dispatcher` is the stream's, on its own thread)."""
        try:
            worker = self._workers[id(dispatcher)]
        except KeyError:
            worker = None
        if worker is None or worker.dispatcher is not dispatcher:
            worker = self._workers[id(dispatcher)] = RouterWorker(dispatcher, self.stats(dispatcher))
        return worker

    def stats(self, dispatcher: Any) -> RouterStats | None:
        if self._stat_prefix is None or self._store_for is None:
            return None
        stats = self._stats.get(id(dispatcher))
        if stats is None:
            stats = self._stats[id(dispatcher)] = RouterStats(self._store_for(dispatcher), self._stat_prefix)
        return stats


def create_router_filter_factory(proto: Any, factory_context: Any) -> FilterFactoryCb:
    """Factory for the HCM: `factory_context.cluster_manager` is the main ClusterManager; the HCM's
    stat_prefix, when the context carries it (`extras["http_stat_prefix"]`), names the router stats."""
    extras = getattr(factory_context, "extras", None) or {}
    hcm_prefix = extras.get("http_stat_prefix")
    config = RouterConfig(
        proto,
        factory_context.cluster_manager.thread_local,
        f"http.{hcm_prefix}." if hcm_prefix is not None else None,
        getattr(factory_context, "store_for", None),
    )

    def factory(callbacks: Any) -> None:
        callbacks.add_stream_decoder_filter(Router(config))

    return factory


def final_timeout_ms(route: "Route", headers: HeaderMap, config: RouterConfig,
                     present: AbstractSet[str] | None = None) -> tuple[int, int]:
    """FilterUtility::finalTimeout: (global, per-try) timeouts in ms, 0 meaning none.

    The route's timeout and retry_policy.per_try_timeout, overridden by valid
    x-envoy-upstream-rq-timeout-ms / x-envoy-upstream-rq-per-try-timeout-ms headers (removed
    here); a per-try timeout not below the global one is dropped. Unless suppressed, sets
    x-envoy-expected-rq-timeout-ms to the per-try timeout, else the global one.
    `present` (the control headers the request carries), when given, skips looking for absent ones.
    """
    timeout = route.timeout_ms
    per_try = route.retry_policy.per_try_timeout_ms if route.retry_policy is not None else 0
    if present is not None and not present:
        per_try_header = None  # none of the headers below
    else:
        # headers.get on this package's own map, without a call: `index` holds each key's first
        # value; a header absent from `present` (when given) is not looked up.
        index = headers.first_values
        has = index if present is None else present
        expected = None
        if config.respect_expected_rq_timeout and "x-envoy-expected-rq-timeout-ms" in has:
            expected = index["x-envoy-expected-rq-timeout-ms"]
        if expected is not None:
            if expected.isdigit():
                timeout = int(expected)
        else:
            header = index["x-envoy-upstream-rq-timeout-ms"] if "x-envoy-upstream-rq-timeout-ms" in has else None
            if header is not None:
                if header.isdigit():
                    timeout = int(header)
                headers.remove("x-envoy-upstream-rq-timeout-ms")
        per_try_header = (index["x-envoy-upstream-rq-per-try-timeout-ms"]
                          if "x-envoy-upstream-rq-per-try-timeout-ms" in has else None)
    if per_try_header is not None:
        if per_try_header.isdigit():
            per_try = int(per_try_header)
        headers.remove("x-envoy-upstream-rq-per-try-timeout-ms")
    if timeout and per_try >= timeout:
        per_try = 0
    expected_ms = per_try or timeout
    if not config.suppress_envoy_headers and expected_ms > 0:
        headers.set("x-envoy-expected-rq-timeout-ms", str(expected_ms))
    return timeout, per_try


class UpstreamRequest:
    """One attempt to one host: pool callbacks on the way in, response decoder on the way out."""

    # Per-attempt state; the class holds the (immutable) initial values.
    encoder: RequestEncoder | None = None
    _pending: Any = None
    _headers: HeaderMap | None = None
    _end_stream = False
    # What came before the connection: (kind, payload, end_stream); a list once there is any.
    _buffer: list[tuple[str, Any, bool]] | None = None
    _buffered_bytes = 0
    _above_watermark = False
    _read_disabled = 0

    def __init__(self, router: "Router", host: "Host") -> None:
        self.router = router
        self.host = host

    # -- request, from the router --------------------------------------------------------

    def accept_data(self, data: bytes, end_stream: bool) -> None:
        if self.encoder is not None:
            self.encoder.encode_data(data, end_stream)
            return
        if self._buffer is None:
            self._buffer = []
        self._buffer.append(("data", data, end_stream))
        self._buffered_bytes += len(data)
        limit = self.router.cluster.info.per_connection_buffer_limit if self.router.cluster else 0
        if not self._above_watermark and self._buffered_bytes > limit:
            self._above_watermark = True
            self.router.callbacks.on_decoder_filter_above_write_buffer_high_watermark()

    def accept_trailers(self, trailers: HeaderMap) -> None:
        if self.encoder is not None:
            self.encoder.encode_trailers(trailers)
        else:
            if self._buffer is None:
                self._buffer = []
            self._buffer.append(("trailers", trailers, True))

    def read_disable(self, disable: bool) -> None:
        self._read_disabled += 1 if disable else -1
        if self.encoder is not None:
            self.encoder.read_disable(disable)

    def reset(self) -> None:
        """Abandon this attempt (timeout, downstream gone): cancel the pool request or close."""
        if self.encoder is not None:
            self.encoder.reset_stream()
        elif self._pending is not None:
            self._pending.cancel()
        self._pending = None

    # -- PoolCallbacks --------------------------------------------------------------------------

    def on_pool_ready(self, encoder: RequestEncoder, host: "Host") -> None:
        self._pending = None
        assert self._headers is not None
        error = check_request_headers(self._headers)
        if error:
            encoder.reset_stream()  # nothing was written: the codec refused the request
            self.router.on_encode_headers_error(self, error)
            return
        self.encoder = encoder
        router = self.router
        # The router's side of the connection (its on_upstream_connected once):
        info = router._info
        if info.first_upstream_tx is None:
            info.first_upstream_tx = router._clock()
        info.upstream_local_address = encoder.local_address
        if router._per_try_timeout_ms > 0:
            router._maybe_start_per_try_timer()
        encoder.encode_headers(self._headers, self._end_stream)
        if self._buffer:  # the request body and trailers that came before the connection
            buffered, self._buffer = self._buffer, []
            for kind, payload, end in buffered:
                if encoder.done:
                    break
                if kind == "data":
                    encoder.encode_data(payload, end)
                else:
                    encoder.encode_trailers(payload)
        if self._above_watermark:
            self._above_watermark = False
            self.router.callbacks.on_decoder_filter_below_write_buffer_low_watermark()
        if self._read_disabled:
            for _ in range(self._read_disabled):
                encoder.read_disable(True)

    def on_pool_failure(self, reason: PoolFailureReason, transport_failure_reason: str, host: "Host") -> None:
        self._pending = None
        self.router.on_upstream_reset(self, POOL_FAILURE_TO_RESET[reason], transport_failure_reason)

    # -- ResponseDecoder --------------------------------------------------------------------------

    def decode_1xx_headers(self, headers: HeaderMap) -> None:
        self.router.callbacks.encode_1xx_headers(headers)

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.router.on_upstream_headers(self, headers, end_stream)

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        router = self.router  # the router's side of a response body, here (no call between)
        if self is not router.upstream:
            return
        if end_stream:
            router._on_upstream_complete(router._clock())
        router.callbacks.encode_data(data, end_stream)

    def decode_trailers(self, trailers: HeaderMap) -> None:
        self.router.on_upstream_trailers(self, trailers)

    def on_reset_stream(self, reason: StreamResetReason, details: str) -> None:
        self.router.on_upstream_reset(self, reason, "")

    def on_above_write_buffer_high_watermark(self) -> None:
        self.router.callbacks.on_decoder_filter_above_write_buffer_high_watermark()

    def on_below_write_buffer_low_watermark(self) -> None:
        self.router.callbacks.on_decoder_filter_below_write_buffer_low_watermark()


class Router:
    """The router filter for one stream."""

    # Per-stream state. The class holds the (immutable) initial values, so a new stream sets
    # only what it uses.
    callbacks: StreamDecoderFilterCallbacks = None  # type: ignore[assignment]
    route: Route | None = None
    cluster: ThreadLocalCluster | None = None
    upstream: UpstreamRequest | None = None
    _request_headers: HeaderMap | None = None
    _timeout_ms = 0
    _per_try_timeout_ms = 0
    _timer: ResponseTimer | None = None
    _per_try_timer: Any = None
    _retry_timer: Any = None
    _retry: RetryState | None = None
    # The request body kept for a retry (None once it outgrew the limit: no more retries).
    _retry_body: bytearray | None = None
    _request_trailers: HeaderMap | None = None
    _attempts = 0
    # Set when a retry was wanted but not allowed: URX (limit) or UO (retry circuit breaker).
    _retry_flag = ""
    _downstream_end_stream = False
    _downstream_response_started = False
    _request_complete_at = 0.0
    _internal = False
    _read_disabled = 0
    _hash_key: int | None = None
    _tried_hosts: tuple[Host, ...] = ()
    # request_mirror_policies: the finalized request, sent to each mirror once it is complete.
    _shadow_headers: HeaderMap | None = None
    _shadow_body: bytearray | None = None
    _stats: RouterStats | None = None
    _worker: RouterWorker = None  # type: ignore[assignment]
    # The stream's StreamInfo and dispatcher (read once from the callbacks by decode_headers).
    _info: Any = None
    _dispatcher: Any = None
    # The stream dispatcher's monotonic clock, bound by decode_headers.
    _clock: Callable[[], float] = None  # type: ignore[assignment]

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def set_decoder_filter_callbacks(self, callbacks: StreamDecoderFilterCallbacks) -> None:
        self.callbacks = callbacks
        add = getattr(callbacks, "add_downstream_watermark_callbacks", None)
        if add is not None:
            add(self)

    # -- StreamDecoderFilter ---------------------------------------------------------------------

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        cb = self.callbacks
        info = self._info = cb.stream_info
        dispatcher = self._dispatcher = cb.dispatcher
        self._clock = dispatcher.time_source.monotonic
        self._request_headers = headers
        self._downstream_end_stream = end_stream
        config = self.config
        worker = config._workers.get(id(dispatcher))  # config.worker(dispatcher), its usual case inline
        if worker is None or worker.dispatcher is not dispatcher:
            worker = config.worker(dispatcher)
        self._worker = worker
        stats = self._stats = worker.stats
        if stats is not None:
            counter = stats.rq_total  # Counter.inc, inline
            counter.value += 1
            counter.used = True
        route: Route | None = cb.route()  # type: ignore[assignment]
        if route is None:
            if stats is not None:
                stats.no_route.inc()
            info.add_response_flag("NR")
            cb.send_local_reply(404, b"", None, None, DETAILS_ROUTE_NOT_FOUND)
            return FilterHeadersStatus.StopIteration
        self.route = route
        info.route_name = route.name
        info.route_metadata = route.metadata
        if route.action == "direct_response":
            if stats is not None:
                stats.rq_direct_response.inc()
            cb.send_local_reply(route.direct_status, route.direct_body, self._finalize_local_reply,
                                None, DETAILS_DIRECT_RESPONSE)
            return FilterHeadersStatus.StopIteration
        if route.action == "redirect":
            if stats is not None:
                stats.rq_redirect.inc()
            location = route.redirect_location(headers)

            def add_location(h: HeaderMap) -> None:
                h.set("location", location)
                self._finalize_local_reply(h)

            cb.send_local_reply(route.redirect_code, b"", add_location, None, DETAILS_DIRECT_RESPONSE)
            return FilterHeadersStatus.StopIteration

        cluster_name = route.cluster_name or route.cluster_for(headers, cb.stream_id)
        tlcm = worker.cluster_manager
        if tlcm is None:
            tlcm = worker.cluster_manager = self.config.thread_local_cluster_manager()
        cluster = tlcm._clusters.get(cluster_name)  # tlcm.get(cluster_name), without the call
        if cluster is None:
            info.upstream_cluster = ""
            if stats is not None:
                stats.no_cluster.inc()
            info.add_response_flag("NC")
            cb.send_local_reply(route.cluster_not_found_response_code, b"", self._finalize_local_reply,
                                None, DETAILS_CLUSTER_NOT_FOUND)
            return FilterHeadersStatus.StopIteration
        self.cluster = cluster
        info.upstream_cluster = cluster.info.observability_name
        info.cluster_metadata = cluster.info.metadata
        # The HCM already stripped a downstream request's control headers (cleanInternalHeaders);
        # what is left came from a filter or a trusted sender and is honoured.
        index = headers.first_values  # the map's keys
        present = _CONTROL_HEADERS.intersection(index)  # which of them the request carries
        self._internal = "x-envoy-internal" in present and index["x-envoy-internal"] == "true"

        if cluster.uses_hash and route.hash_policy:
            conn = info.connection
            self._hash_key = route.hash_policy.generate_hash(headers, conn.direct_remote_address or conn.remote_address)
        host = cluster.choose_host(self._hash_key)
        if host is None:
            self._no_healthy_upstream()
            return FilterHeadersStatus.StopIteration

        self._timeout_ms, self._per_try_timeout_ms = final_timeout_ms(route, headers, self.config, present)
        if route.retry_policy is not None or "x-envoy-retry-on" in present or "x-envoy-max-retries" in present:
            self._retry = RetryState.create(route.retry_policy, headers)
            if self._retry is not None:
                self._retry_body = bytearray()
        keep_original = not self.config.suppress_envoy_headers
        if not route.finalize_request_noop:
            route.finalize_request_headers(headers, info, keep_original)
        if route.auto_host_rewrite and host.hostname:
            update_authority(headers, host.hostname, route.append_x_forwarded_host, keep_original)
        for name in _HOP_BY_HOP.intersection(headers.first_values):  # remove_hop_by_hop, inline: usually none
            headers.remove(name)
        if route.mirror_policies:
            self._shadow_headers = headers.copy()
            self._shadow_body = bytearray()
        if end_stream:
            self._on_request_complete()
        self._start_attempt(host)
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        if self.cluster is None:
            return FilterDataStatus.StopIterationNoBuffer
        chunk = bytes(data)
        if self._shadow_body is not None:
            self._shadow_body += chunk
        if self._retry_body is not None:
            if len(self._retry_body) + len(chunk) > self.cluster.info.per_connection_buffer_limit:
                # Envoy stops retrying a request whose body outgrew the retry buffer.
                self._retry_body = None
                self._retry = None
            else:
                self._retry_body += chunk
        if end_stream:
            self._downstream_end_stream = True
            self._on_request_complete()
        if self.upstream is not None:
            self.upstream.accept_data(chunk, end_stream)
            if end_stream:
                self._maybe_start_per_try_timer()
        return FilterDataStatus.StopIterationNoBuffer

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        if self.cluster is None:
            return FilterTrailersStatus.StopIteration
        self._request_trailers = trailers
        self._downstream_end_stream = True
        self._on_request_complete()
        if self.upstream is not None:
            self.upstream.accept_trailers(trailers)
            self._maybe_start_per_try_timer()
        return FilterTrailersStatus.StopIteration

    def on_destroy(self) -> None:
        if self._timer is not None or self._per_try_timer is not None or self._retry_timer is not None:
            self._cleanup()  # usually done already, when the response completed
        remove = getattr(self.callbacks, "remove_downstream_watermark_callbacks", None)
        if remove is not None:
            remove(self)
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            upstream.reset()

    # -- DownstreamWatermarkCallbacks (the downstream connection's write buffer) -----------------------

    def on_above_write_buffer_high_watermark(self) -> None:
        self._read_disabled += 1
        if self.upstream is not None:
            self.upstream.read_disable(True)

    def on_below_write_buffer_low_watermark(self) -> None:
        self._read_disabled -= 1
        if self.upstream is not None:
            self.upstream.read_disable(False)

    # -- attempts ---------------------------------------------------------------------------

    def _start_attempt(self, host: "Host") -> None:
        assert self.cluster is not None and self._request_headers is not None
        self._attempts += 1
        info = self._info
        info.attempt_count = info.upstream_request_attempt_count = self._attempts
        info.upstream_host = host.address
        headers = self._request_headers
        if self._attempts > 1 and not self.config.suppress_envoy_headers:
            self._set_remaining_timeout_header(headers)
        vh = self.route.virtual_host if self.route is not None else None
        if vh is not None and vh.include_request_attempt_count:
            headers.set("x-envoy-attempt-count", str(self._attempts))
        self._tried_hosts += (host,)
        upstream = UpstreamRequest(self, host)
        if self._read_disabled:
            for _ in range(self._read_disabled):
                upstream.read_disable(True)
        self.upstream = upstream
        replay = self._attempts > 1
        body = bytes(self._retry_body or b"") if replay else b""
        trailers = self._request_trailers if replay else None
        headers_end = self._downstream_end_stream and not body and trailers is None
        # The attempt starts: its pool request (the UpstreamRequest is the pool's callbacks and decoder).
        upstream._headers = headers
        upstream._end_stream = headers_end
        upstream._pending = self.cluster.conn_pool(host).new_stream(upstream, upstream)
        if self.upstream is not upstream:
            return  # failed at once (pool overflow)
        if replay:
            if body:
                upstream.accept_data(body, self._downstream_end_stream and trailers is None)
            if trailers is not None:
                upstream.accept_trailers(trailers)
        if self._per_try_timeout_ms > 0:
            self._maybe_start_per_try_timer()

    def _send_shadows(self) -> None:
        """Mirror the request (ShadowWriterImpl): fire and forget through the AsyncClient."""
        assert self.route is not None and self._shadow_headers is not None
        tlcm = self.config.thread_local_cluster_manager()
        for cluster, fraction, suffix in self.route.mirror_policies:
            if fraction is not None and self.callbacks.stream_id % fraction[1] >= fraction[0]:
                continue
            if tlcm.get(cluster) is None:
                continue
            headers = self._shadow_headers.copy()
            if suffix:
                headers.set(":authority", shadow_authority(headers.get(":authority") or ""))
            tlcm.http_async_client().send(cluster, headers, bytes(self._shadow_body or b""),
                                          self._request_trailers, self._timeout_ms, _IGNORE_RESPONSE)
        self._shadow_headers = self._shadow_body = None

    def _set_remaining_timeout_header(self, headers: HeaderMap) -> None:
        """FilterUtility::setTimeoutHeaders on a retry: tell the upstream the time left."""
        expected = self._per_try_timeout_ms or self._timeout_ms
        if expected <= 0:
            return
        if self._timeout_ms > 0:
            elapsed = int((self._now() - self._request_complete_at) * 1000 + 1e-6) if self._request_complete_at else 0
            expected = 1 if elapsed >= self._timeout_ms else min(expected, self._timeout_ms - elapsed)
        headers.set("x-envoy-expected-rq-timeout-ms", str(expected))

    def _maybe_start_per_try_timer(self) -> None:
        """The per-try timeout runs from the end of the request for each attempt."""
        if self._per_try_timeout_ms <= 0 or not self._downstream_end_stream:
            return
        if self.upstream is None or self.upstream.encoder is None:
            return  # started again once the pool hands us a connection
        if self._per_try_timer is None:
            self._per_try_timer = self.callbacks.dispatcher.create_timer(self._on_per_try_timeout)
        self._per_try_timer.enable_timer(self._per_try_timeout_ms)

    def _schedule_retry(self) -> bool:
        """Back off and retry if the policy and the retry circuit breaker allow it."""
        retry = self._retry
        if retry is None or self.cluster is None or self._retry_body is None:
            return False
        if retry.retries_remaining <= 0:
            self.cluster.stats.inc("upstream_rq_retry_limit_exceeded")
            self._retry_flag = "URX"
            return False
        retries = self.cluster.info.resource_manager.retries
        if not retries.can_create():
            self.cluster.stats.inc("upstream_rq_retry_overflow")
            self._retry_flag = "UO"
            return False
        retry.retries_remaining -= 1
        retries.inc()
        self.cluster.stats.inc("upstream_rq_retry")
        self.cluster.stats.inc("upstream_rq_retry_backoff_exponential")
        self.upstream = None
        if self._per_try_timer is not None:
            self._per_try_timer.disable_timer()
        if self._retry_timer is None:
            self._retry_timer = self.callbacks.dispatcher.create_timer(self._do_retry)
        self._retry_timer.enable_timer(retry.next_backoff_ms())
        return True

    def _do_retry(self) -> None:
        assert self.cluster is not None and self._retry is not None
        self.cluster.info.resource_manager.retries.dec()
        host = self.cluster.choose_host(self._hash_key)
        policy = self._retry.policy
        if policy.avoid_previous_hosts:
            for _ in range(policy.host_selection_retry_max_attempts):
                if host is None or host not in self._tried_hosts:
                    break
                host = self.cluster.choose_host(self._hash_key)
        if host is None:
            self._no_healthy_upstream()
            return
        self._start_attempt(host)

    def _no_healthy_upstream(self) -> None:
        assert self.cluster is not None
        self._attempts = max(self._attempts, 1)  # Envoy counts the attempt that found no host
        info = self.callbacks.stream_info
        info.attempt_count = info.upstream_request_attempt_count = self._attempts
        self.callbacks.stream_info.add_response_flag("UH")
        self.cluster.stats.charge_response_code(503, self._internal)
        self.callbacks.send_local_reply(503, NO_HEALTHY_UPSTREAM, self._finalize_local_reply, None,
                                        DETAILS_NO_HEALTHY_UPSTREAM)

    # -- timing ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self.callbacks.dispatcher.time_source.monotonic()

    def _on_request_complete(self) -> None:
        self._request_complete_at = self._clock()
        if self._shadow_headers is not None:
            self._send_shadows()
        if self._timeout_ms > 0 and self._timer is None:
            self._timer = self._worker.arm_response_timer(self, self._timeout_ms)

    def _cleanup(self) -> None:
        response_timer = self._timer
        if response_timer is not None:
            self._timer = None
            self._worker.release_response_timer(response_timer)
        timer = self._per_try_timer
        if timer is not None:
            timer.disable_timer()
            self._per_try_timer = None
        timer = self._retry_timer
        if timer is not None:
            if timer.enabled() and self.cluster is not None:
                self.cluster.info.resource_manager.retries.dec()
            timer.disable_timer()
            self._retry_timer = None

    def _on_response_timeout(self) -> None:
        """The route timeout fired (through this stream's ResponseTimer)."""
        response_timer = self._timer
        if response_timer is not None:
            self._timer = None
            self._worker.release_response_timer(response_timer)
        upstream = self.upstream
        if self.cluster is None:
            return
        self.upstream = None
        self.cluster.stats.inc("upstream_rq_timeout")
        if upstream is not None:
            upstream.host.stats.rq_timeout += 1
            if self.cluster.info.outlier_detector is not None:
                self.cluster.info.outlier_detector.put_response(upstream.host, 504)
            upstream.reset()
        self._cleanup()
        self._abort(upstream, 504, "UT", UPSTREAM_REQUEST_TIMEOUT, DETAILS_RESPONSE_TIMEOUT)

    def _on_per_try_timeout(self) -> None:
        upstream = self.upstream
        if upstream is None or self.cluster is None or self._downstream_response_started:
            return
        self.cluster.stats.inc("upstream_rq_per_try_timeout")
        upstream.host.stats.rq_timeout += 1
        if self.cluster.info.outlier_detector is not None:
            self.cluster.info.outlier_detector.put_response(upstream.host, 504)
        self.upstream = None
        upstream.reset()
        if self._retry is not None and self._retry.would_retry_per_try_timeout() and self._schedule_retry():
            return
        self._cleanup()
        self._abort(upstream, 504, "UT", UPSTREAM_REQUEST_TIMEOUT, DETAILS_RESPONSE_TIMEOUT)

    def _abort(self, upstream: UpstreamRequest | None, code: int, flag: str, body: str, details: str) -> None:
        """onUpstreamAbort: a local reply if nothing was sent downstream yet, else a reset."""
        info = self.callbacks.stream_info
        if self._retry_flag:
            info.add_response_flag(self._retry_flag)  # Envoy logs e.g. "URX,UF"
        info.add_response_flag(flag)
        if self._downstream_response_started:
            info.response_code_details = details.replace("_before_response_started", "_after_response_started")
            if self._stats is not None:
                self._stats.rq_reset_after_downstream_response_started.inc()
            self.callbacks.reset_stream()
            return
        if upstream is not None:
            upstream.host.stats.rq_error += 1
        assert self.cluster is not None
        self.cluster.stats.charge_response_code(code, self._internal)
        overloaded = flag == "UO" and not self.config.suppress_envoy_headers

        def modify(headers: HeaderMap) -> None:
            self._finalize_local_reply(headers, attempt_count=False)
            if overloaded:
                headers.add("x-envoy-overloaded", "true")
            self._add_attempt_count(headers)

        self.callbacks.send_local_reply(code, body, modify, None, details)

    def _finalize_local_reply(self, headers: HeaderMap, attempt_count: bool = True) -> None:
        """A direct response or redirect adds its route's response headers itself; a route to a
        cluster has them added by the filter manager for every local reply (so never twice)."""
        if self.route is not None:
            if self.route.action != "route":
                self.route.finalize_response_headers(headers, self.callbacks.stream_info, self._request_headers)
            if attempt_count:
                self._add_attempt_count(headers)

    def _add_attempt_count(self, headers: HeaderMap) -> None:
        if self._attempts and self.route is not None and self.route.virtual_host.include_attempt_count_in_response:
            headers.set("x-envoy-attempt-count", str(self._attempts))

    # -- upstream events ---------------------------------------------------------------------------

    def on_encode_headers_error(self, upstream: UpstreamRequest, message: str) -> None:
        """The upstream codec refused the request headers: 503 with its message, flag DPE."""
        if upstream is not self.upstream:
            return
        self.upstream = None
        self._cleanup()
        self.callbacks.stream_info.add_response_flag("DPE")
        details = "filter_removed_required_request_headers{" + message.replace(" ", "_") + "}"
        self.callbacks.send_local_reply(503, message, self._finalize_local_reply, None, details)

    def on_upstream_reset(self, upstream: UpstreamRequest, reason: StreamResetReason, transport_failure: str) -> None:
        if upstream is not self.upstream:
            return
        detector = self.cluster.info.outlier_detector if self.cluster is not None else None
        if detector is not None and reason is not StreamResetReason.Overflow:
            detector.put_response(upstream.host, 503)  # a local-origin failure counts as 503
        if (
            not self._downstream_response_started
            and self._retry is not None
            and self._retry.would_retry_reset(reason)
            and self._schedule_retry()
        ):
            upstream.host.stats.rq_error += 1
            return
        self.upstream = None
        self._cleanup()
        info = self.callbacks.stream_info
        if transport_failure:
            info.upstream_transport_failure_reason = transport_failure
        code = 502 if reason is StreamResetReason.ProtocolError else 503
        retried = "retried and the latest " if self._attempts > 1 else ""
        # Envoy 1.40 names the transport failure in the details, not in the body.
        body = RESET_BEFORE_HEADERS + retried + "reset reason: " + reason.value
        detail = reason.value.replace(" ", "_")
        if transport_failure:
            detail += "|" + transport_failure.replace(" ", "_")
        self._abort(upstream, code, _RESET_FLAGS[reason], body,
                    "upstream_reset_before_response_started{" + detail + "}")

    def on_upstream_headers(self, upstream: UpstreamRequest, headers: HeaderMap, end_stream: bool) -> None:
        if upstream is not self.upstream:
            return
        cb = self.callbacks
        info = self._info
        now = self._clock()
        status_text = headers.first_values.get(":status") or "0"
        status = int(status_text) if status_text.isdigit() else 0
        assert self.cluster is not None and self.route is not None
        if status >= 500:
            upstream.host.stats.rq_error += 1
        else:
            upstream.host.stats.rq_success += 1
        detector = self.cluster.info.outlier_detector
        if detector is not None:
            detector.put_response(upstream.host, status)
        retry = self._retry
        if retry is not None:
            if retry.would_retry_headers(status, headers):
                if self._downstream_end_stream and self._schedule_retry():
                    # A discarded response counts under "retry." only (Envoy's chargeUpstreamCode).
                    self.cluster.stats.charge_response_code(status, self._internal, retry=True)
                    upstream.reset()  # HTTP/1 cannot skip the rest of a response: close
                    return
                if self._retry_flag:
                    info.add_response_flag(self._retry_flag)
            elif self._attempts > 1:
                self.cluster.stats.inc("upstream_rq_retry_success")
        self.cluster.stats.charge_response_code(status, self._internal)
        if self._per_try_timer is not None:
            self._per_try_timer.disable_timer()
        info.first_upstream_rx = now
        info.response_code = status  # before the encoder filters see the headers, as Envoy's router
        for name in _HOP_BY_HOP.intersection(headers.first_values):  # remove_hop_by_hop, inline: usually none
            headers.remove(name)
        if not self.config.suppress_envoy_headers:
            start = self._request_complete_at or (info.first_upstream_tx or now)
            headers.set("x-envoy-upstream-service-time", str(int((now - start) * 1000)))
        route = self.route
        if not route.finalize_response_noop:
            route.finalize_response_headers(headers, info, self._request_headers)
        if route.virtual_host.include_attempt_count_in_response:
            headers.set("x-envoy-attempt-count", str(self._attempts))
        info.response_code_details = DETAILS_VIA_UPSTREAM
        self._downstream_response_started = True
        if end_stream:
            self._on_upstream_complete(now)
        cb.encode_headers(headers, end_stream)

    def on_upstream_trailers(self, upstream: UpstreamRequest, trailers: HeaderMap) -> None:
        if upstream is not self.upstream:
            return
        self._on_upstream_complete(self._clock())
        self.callbacks.encode_trailers(trailers)

    def _on_upstream_complete(self, now: float) -> None:
        self._info.last_upstream_rx = now
        if self._per_try_timer is None and self._retry_timer is None:
            # _cleanup(), inline for its usual case: only the response timer (if any) to release.
            response_timer = self._timer
            if response_timer is not None:
                self._timer = None
                self._worker.release_response_timer(response_timer)
        else:
            self._cleanup()
        if self.cluster is not None and self._request_complete_at:
            self.cluster.stats.record_rq_time((now - self._request_complete_at) * 1000, self._internal)
        self.upstream = None
