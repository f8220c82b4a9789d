"""ClusterStats: one thread's view of `cluster.<name>.*` stats, with Envoy's names.

Each worker (and main) has its own Store and is its only writer; this wrapper
caches the metric objects so the request path does one dict lookup per update.
"""

from __future__ import annotations

from ..stats.store import Counter, Gauge, Histogram, Store, Unit, record_each


# The counters (and the gauges wasmproxy maintains) Envoy lists for every cluster from its
# creation, at 0 until they happen (ALL_CLUSTER_*_STATS, as Envoy 1.40's /stats shows them).
DECLARED_COUNTERS = (
    "assignment_stale", "assignment_timeout_received", "assignment_use_cached", "bind_errors", "lb_healthy_panic",
    "lb_local_cluster_not_ok", "lb_recalculate_zone_structures", "lb_subsets_created", "lb_subsets_fallback",
    "lb_subsets_fallback_panic", "lb_subsets_removed", "lb_subsets_selected", "lb_zone_cluster_too_small",
    "lb_zone_no_capacity_left", "lb_zone_routing_all_directly", "lb_zone_routing_cross_zone",
    "lb_zone_routing_sampled", "original_dst_host_invalid", "retry_or_shadow_abandoned", "update_attempt",
    "update_empty", "update_failure", "update_no_rebuild", "update_success", "upstream_cx_close_notify",
    "upstream_cx_connect_attempts_exceeded", "upstream_cx_connect_fail", "upstream_cx_connect_timeout",
    "upstream_cx_connect_with_0_rtt", "upstream_cx_destroy", "upstream_cx_destroy_local",
    "upstream_cx_destroy_local_with_active_rq", "upstream_cx_destroy_remote",
    "upstream_cx_destroy_remote_with_active_rq", "upstream_cx_destroy_with_active_rq", "upstream_cx_http1_total",
    "upstream_cx_http2_total", "upstream_cx_http3_total", "upstream_cx_idle_timeout",
    "upstream_cx_max_duration_reached", "upstream_cx_max_requests", "upstream_cx_none_healthy",
    "upstream_cx_overflow", "upstream_cx_pool_overflow", "upstream_cx_preconnect_skipped",
    "upstream_cx_protocol_error", "upstream_cx_rx_bytes_total", "upstream_cx_total", "upstream_cx_tx_bytes_total",
    "upstream_flow_control_backed_up_total", "upstream_flow_control_drained_total",
    "upstream_flow_control_paused_reading_total", "upstream_flow_control_resumed_reading_total",
    "upstream_http3_broken", "upstream_internal_redirect_failed_total", "upstream_internal_redirect_succeeded_total",
    "upstream_rq_0rtt", "upstream_rq_active_overflow", "upstream_rq_cancelled", "upstream_rq_completed",
    "upstream_rq_maintenance_mode", "upstream_rq_max_duration_reached", "upstream_rq_pending_failure_eject",
    "upstream_rq_pending_overflow", "upstream_rq_pending_total", "upstream_rq_per_try_idle_timeout",
    "upstream_rq_per_try_timeout", "upstream_rq_retry", "upstream_rq_retry_backoff_exponential",
    "upstream_rq_retry_backoff_ratelimited", "upstream_rq_retry_limit_exceeded", "upstream_rq_retry_overflow",
    "upstream_rq_retry_success", "upstream_rq_rx_reset", "upstream_rq_rx_reset_no_error", "upstream_rq_timeout",
    "upstream_rq_total", "upstream_rq_tx_reset",
)
DECLARED_GAUGES = ("upstream_cx_active", "upstream_rq_active", "upstream_rq_pending_active")


class ClusterStats:
    """Metrics are created in the Store on first use (as before any caching: /stats lists
    exactly the ones that were touched), then kept here so the hot path skips the name."""

    __slots__ = ("prefix", "_store", "_counters", "_gauges", "_histograms", "_response_codes", "_rq_time")

    def __init__(self, store: Store, prefix: str) -> None:
        self.prefix = prefix  # "cluster.<observability_name>."
        self._store = store
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        # (code, internal, retry) -> the counters one response charges, in Envoy's order.
        self._response_codes: dict[tuple[int, bool, bool], tuple[Counter, ...]] = {}
        # internal -> (upstream_rq_time, internal./external.upstream_rq_time)
        self._rq_time: dict[bool, tuple[Histogram, Histogram]] = {}

    def declare(self) -> None:
        """Create Envoy's always-listed cluster stats (at 0)."""
        for name in DECLARED_COUNTERS:
            self.inc(name, 0)
        for name in DECLARED_GAUGES:
            self.gauge_add(name, 0)

    def counter(self, name: str) -> Counter:
        """The counter `name` (created in the Store now if it was not yet), to bind once and
        `inc()` on the hot path."""
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = self._store.counter(self.prefix + name)
        return c

    def gauge(self, name: str) -> Gauge:
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = self._store.gauge(self.prefix + name)
        return g

    def inc(self, name: str, n: int = 1) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = self._store.counter(self.prefix + name)
        c.inc(n)

    def gauge_add(self, name: str, n: int) -> None:
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = self._store.gauge(self.prefix + name)
        g.inc(n)

    def gauge_set(self, name: str, value: int) -> None:
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = self._store.gauge(self.prefix + name)
        g.set(value)

    def record_ms(self, name: str, value: float) -> None:
        h = self._histograms.get(name)
        if h is None:
            h = self._histogram_ms(name)
        h.record(value)

    def _histogram_ms(self, name: str) -> Histogram:
        h = self._histograms.get(name)
        if h is None:
            h = self._histograms[name] = self._store.histogram(self.prefix + name, Unit.MILLISECONDS)
        return h

    def record_rq_time(self, elapsed_ms: float, internal: bool) -> None:
        """upstream_rq_time and its internal./external. copy, for one completed request."""
        try:
            pair = self._rq_time[internal]
        except KeyError:
            pair = self._rq_time[internal] = (
                self._histogram_ms("upstream_rq_time"),
                self._histogram_ms(("internal." if internal else "external.") + "upstream_rq_time"),
            )
        record_each(pair, elapsed_ms)

    def record(self, name: str, value: float) -> None:
        self._store.histogram(self.prefix + name, Unit.UNSPECIFIED).record(value)

    def charge_response_code(self, code: int, internal: bool, retry: bool = False) -> None:
        """upstream_rq_<code>, upstream_rq_<N>xx and upstream_rq_completed, plus the
        internal./external. copies (CodeStatsImpl::chargeResponseStat); a response discarded
        for a retry counts only under "retry."."""
        try:
            counters = self._response_codes[code, internal, retry]
        except KeyError:
            counters = self._response_codes[code, internal, retry] = self._code_counters(code, internal, retry)
        for c in counters:  # store.inc_each, inline
            c.value += 1
            c.used = True

    def _code_counters(self, code: int, internal: bool, retry: bool) -> tuple[Counter, ...]:
        names: list[str] = []
        for name in (f"upstream_rq_{code}", f"upstream_rq_{code // 100}xx", "upstream_rq_completed"):
            if retry:
                names.append("retry." + name)
            else:
                names.append(name)
                names.append(("internal." if internal else "external.") + name)
        return tuple(self.counter(name) for name in names)
