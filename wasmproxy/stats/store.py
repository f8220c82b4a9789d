"""Store: one thread's counters, gauges and histograms (plain ints, no locks).

Each thread (main and every worker) owns one Store and is the only writer of
its metrics, so the hot path is a Python attribute add. The main thread's
:class:`~wasmproxy.stats.registry.StatsRegistry` reads every Store to merge
them for admin: reading an int another thread writes is safe under the GIL
and on free-threaded CPython (ints are immutable; the read sees the old or the
new value), and a snapshot that is a few increments behind is what Envoy's
periodic flush shows too.

Names are Envoy's full dotted names (``cluster.<name>.upstream_rq_total``).
"""

from __future__ import annotations

import enum

from wasmproxy.stats.histogram import _SMALL_INT_KEYS, HistogramBins, bin_key

__all__ = ["Counter", "Gauge", "Histogram", "ImportMode", "Store", "Unit", "inc_each", "record_each"]


class ImportMode(enum.Enum):
    """Envoy's ``Gauge::ImportMode``: whether a gauge is summed across hot restarts."""

    ACCUMULATE = "Accumulate"
    NEVER_IMPORT = "NeverImport"


class Unit(enum.Enum):
    """Envoy's ``Histogram::Unit``."""

    UNSPECIFIED = "Unspecified"
    BYTES = "Bytes"
    MICROSECONDS = "Microseconds"
    MILLISECONDS = "Milliseconds"
    PERCENT = "Percent"


class Counter:
    """A monotonically increasing count. Owner thread only."""

    __slots__ = ("name", "used", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        self.used = False

    def inc(self, n: int = 1) -> None:
        self.value += n
        self.used = True

    add = inc


def inc_each(counters: tuple[Counter, ...]) -> None:
    """``c.inc()`` for each counter: one call for a group that always moves together
    (a response code's upstream_rq_<code>, _<N>xx and _completed)."""
    for c in counters:
        c.value += 1
        c.used = True


class Gauge:
    """A value that goes up and down. Owner thread only; merged by summing."""

    __slots__ = ("import_mode", "name", "used", "value")

    def __init__(self, name: str, import_mode: ImportMode = ImportMode.ACCUMULATE) -> None:
        self.name = name
        self.import_mode = import_mode
        self.value = 0
        self.used = False

    def set(self, v: int) -> None:
        self.value = v
        self.used = True

    def inc(self, n: int = 1) -> None:
        self.value += n
        self.used = True

    def dec(self, n: int = 1) -> None:
        self.value -= n
        self.used = True

    add = inc
    sub = dec


class Histogram:
    """Recorded values of one distribution on one thread. Owner thread only.

    Values go into log-linear bins (Envoy's circllhist) since the last flush;
    the registry moves them into interval/cumulative views on main.
    """

    __slots__ = ("bins", "name", "unit", "used")

    def __init__(self, name: str, unit: Unit = Unit.UNSPECIFIED) -> None:
        self.name = name
        self.unit = unit
        self.used = False
        self.bins = HistogramBins()

    def record(self, value: float) -> None:
        """Record one sample. Envoy's ``recordValue`` takes a uint64, so fractions are
        truncated (0.7 ms is recorded as 0, as Envoy's duration_cast would) and negatives are 0."""
        v = int(value)
        if v < 0:
            v = 0
        # HistogramBins.insert of a non-negative int, inline.
        key = _SMALL_INT_KEYS[v] if v < 10_000 else bin_key(v)
        counts = self.bins.counts
        counts[key] = counts.get(key, 0) + 1
        self.used = True

    record_value = record


def record_each(histograms: tuple[Histogram, ...], value: float) -> None:
    """``h.record(value)`` for each histogram, the bin computed once (a request's
    upstream_rq_time and its internal./external. copy)."""
    v = int(value)
    if v < 0:
        v = 0
    key = _SMALL_INT_KEYS[v] if v < 10_000 else bin_key(v)
    for h in histograms:
        counts = h.bins.counts
        counts[key] = counts.get(key, 0) + 1
        h.used = True


class Store:
    """One thread's metrics by full name; ``counter()`` etc. create on first use."""

    def __init__(self, thread_name: str = "main_thread") -> None:
        self.thread_name = thread_name
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}

    def counter(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counter(name)
        return c

    def gauge(self, name: str, import_mode: ImportMode = ImportMode.ACCUMULATE) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            g = self.gauges[name] = Gauge(name, import_mode)
        return g

    def histogram(self, name: str, unit: Unit = Unit.UNSPECIFIED) -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(name, unit)
        return h
