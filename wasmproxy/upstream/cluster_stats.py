"""ClusterStats: one thread's view of `cluster.<name>.*` stats, with Envoy's names.

Each worker (and main) has its own Store and is its only writer; this wrapper
caches the metric objects so the request path does one dict lookup per update.
"""

from __future__ import annotations

from typing import Any

from ..stats.store import Store, Unit


class ClusterStats:
    __slots__ = ("prefix", "_store", "_counters", "_gauges")

    def __init__(self, store: Store, prefix: str) -> None:
        self.prefix = prefix  # "cluster.<observability_name>."
        self._store = store
        self._counters: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}

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
        self._store.histogram(self.prefix + name, Unit.MILLISECONDS).record(value)

    def record(self, name: str, value: float) -> None:
        self._store.histogram(self.prefix + name, Unit.UNSPECIFIED).record(value)

    def charge_response_code(self, code: int, internal: bool, retry: bool = False) -> None:
        """upstream_rq_<code>, upstream_rq_<N>xx and upstream_rq_completed, plus the
        internal./external. copies (CodeStatsImpl::chargeResponseStat); a response discarded
        for a retry counts only under "retry."."""
        group = f"upstream_rq_{code // 100}xx"
        exact = f"upstream_rq_{code}"
        for name in (exact, group, "upstream_rq_completed"):
            if retry:
                self.inc("retry." + name)
            else:
                self.inc(name)
                self.inc(("internal." if internal else "external.") + name)
