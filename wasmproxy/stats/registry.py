"""StatsRegistry: the main thread's merged view over every thread's Store.

Counters and gauges are summed across threads when read, so admin shows live
values. Histograms, as in Envoy, are merged at each stats flush
(``stats_flush_interval``, 5 s by default; the server's main-thread timer calls
:meth:`StatsRegistry.flush`): the flush computes the *interval* view (samples
since the previous flush) and the *cumulative* view (all samples), and admin
prints both until the next flush.

Reads of another thread's Store take a copy in one C call (``list(d.values())``,
``dict.copy()``), which is atomic with respect to that thread's Python code:
no lock is needed on the writers' hot path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wasmproxy.stats.histogram import DEFAULT_BUCKETS, HistogramBins, HistogramStatistics
from wasmproxy.stats.store import Store, Unit

if TYPE_CHECKING:
    from wasmproxy.event.dispatcher import Dispatcher, Timer

__all__ = ["MergedHistogram", "StatsRegistry"]


@dataclass(frozen=True, slots=True)
class MergedHistogram:
    """One histogram across all threads as of the last flush (Envoy's ParentHistogram)."""

    name: str
    unit: Unit
    used: bool
    interval: HistogramStatistics
    cumulative: HistogramStatistics
    interval_bins: dict[int, int]
    cumulative_bins: dict[int, int]


class StatsRegistry:
    """Holds every thread's Store. ``add_store``/``remove_store`` any thread; reads on main."""

    def __init__(self, supported_buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._stores: list[Store] = []
        # Values of stores that went away (a worker that exited), so totals never go backwards.
        self._retired = Store("retired")
        self._supported_buckets = supported_buckets
        self._hist_cumulative: dict[str, dict[int, int]] = {}
        self._hist_interval: dict[str, dict[int, int]] = {}

    def add_store(self, store: Store) -> Store:
        with self._lock:
            self._stores.append(store)
        return store

    def remove_store(self, store: Store) -> None:
        """Fold ``store``'s values into the retired totals and stop reading it (its thread ended)."""
        with self._lock:
            self._stores = [s for s in self._stores if s is not store]
            for c in list(store.counters.values()):
                rc = self._retired.counter(c.name)
                rc.value += c.value
                rc.used = rc.used or c.used
            for h in list(store.histograms.values()):
                rh = self._retired.histogram(h.name, h.unit)
                rh.bins.merge(h.bins.snapshot())
                rh.used = rh.used or h.used
            # Gauges are current values: a gone thread's gauge no longer counts, as in Envoy.

    def _all_stores(self) -> list[Store]:
        with self._lock:
            return [*self._stores, self._retired]

    # -- live counters and gauges -------------------------------------------------

    def counters(self) -> dict[str, tuple[int, bool]]:
        """name -> (sum over threads, used on any thread)."""
        out: dict[str, tuple[int, bool]] = {}
        for store in self._all_stores():
            for c in list(store.counters.values()):
                prev = out.get(c.name)
                out[c.name] = (c.value, c.used) if prev is None else (prev[0] + c.value, prev[1] or c.used)
        return out

    def gauges(self) -> dict[str, tuple[int, bool]]:
        """name -> (sum over threads, used on any thread)."""
        out: dict[str, tuple[int, bool]] = {}
        for store in self._all_stores():
            for g in list(store.gauges.values()):
                prev = out.get(g.name)
                out[g.name] = (g.value, g.used) if prev is None else (prev[0] + g.value, prev[1] or g.used)
        return out

    # -- histograms -------------------------------------------------------------

    def flush(self) -> None:
        """Main thread: merge histograms (Envoy's ``mergeHistograms`` at stats flush)."""
        merged: dict[str, dict[int, int]] = {}
        for store in self._all_stores():
            for h in list(store.histograms.values()):
                acc = merged.setdefault(h.name, {})
                for k, c in h.bins.snapshot().items():
                    acc[k] = acc.get(k, 0) + c
        self._hist_interval = {
            name: HistogramBins.difference(bins, self._hist_cumulative.get(name, {})) for name, bins in merged.items()
        }
        self._hist_cumulative = merged

    def start_flush_timer(self, dispatcher: Dispatcher, interval_ms: float = 5000) -> Timer:
        """Main dispatcher's thread: ``flush()`` every ``interval_ms`` (Bootstrap
        ``stats_flush_interval``, 5 s by default). Returns the timer (disable it to stop)."""

        def tick() -> None:
            self.flush()
            timer.enable_timer(interval_ms)

        timer = dispatcher.create_timer(tick)
        timer.enable_timer(interval_ms)
        return timer

    def histograms(self) -> dict[str, MergedHistogram]:
        """Every histogram as of the last flush (declared but empty ones included)."""
        meta: dict[str, tuple[Unit, bool]] = {}
        for store in self._all_stores():
            for h in list(store.histograms.values()):
                unit, used = meta.get(h.name, (h.unit, False))
                meta[h.name] = (unit, used or h.used)
        out = {}
        for name, (unit, used) in meta.items():
            cumulative = self._hist_cumulative.get(name, {})
            interval = self._hist_interval.get(name, {})
            out[name] = MergedHistogram(
                name=name,
                unit=unit,
                used=used,
                interval=HistogramStatistics(interval, self._supported_buckets),
                cumulative=HistogramStatistics(cumulative, self._supported_buckets),
                interval_bins=interval,
                cumulative_bins=cumulative,
            )
        return out
