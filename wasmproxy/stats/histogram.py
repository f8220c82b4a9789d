"""Log-linear histogram bins and statistics, as Envoy 1.40 computes them (libcircllhist 0.3.2).

A value goes into a bin of two significant decimal digits: 1234 into
[1200, 1300), 7 into [7.0, 7.1), 0 into the zero bin. Envoy's numbers then
follow from treating the n samples of a bin as spread evenly inside it:

* quantile q is sample k = max(1, ceil(q * N)) of all N (Hyndman-Fan type 1),
  placed at ``left + j / (n + 1) * width`` when it is sample j of the n in its bin;
* a Prometheus bucket ``le=b`` counts the bins whose left edge is <= b;
* the sum counts each sample at its bin's harmonic midpoint ``2*l*u / (l+u)``.

These three rules were fitted to a running Envoy 1.40's admin output
(``/stats``, ``histogram_buckets=detailed``, ``/stats/prometheus``) for known
bins, e.g. 13 samples in [1, 1.1) give P0 1.0071428571428571 (1/14).

A key encodes a bin as one sortable int: ``exp * 100 + val`` with ``val`` in
10..99 and the bin's left edge ``val / 10 * 10**exp``; the zero bin sorts first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = [
    "DEFAULT_BUCKETS",
    "SUPPORTED_QUANTILES",
    "HistogramBins",
    "HistogramStatistics",
    "bins_of",
]

# Envoy's HistogramStatisticsImpl::supportedQuantiles() and defaultBuckets().
SUPPORTED_QUANTILES: tuple[float, ...] = (0, 0.25, 0.5, 0.75, 0.90, 0.95, 0.99, 0.995, 0.999, 1)
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
    60000, 300000, 600000, 1800000, 3600000,
)

_ZERO_KEY = -(10**9)


def bin_key(value: float) -> int:
    """The bin of a non-negative sample (negative and non-finite samples go to zero)."""
    if not value > 0 or math.isinf(value):
        return _ZERO_KEY
    exp = math.floor(math.log10(value))
    val = math.floor(value / 10.0**exp * 10 + 1e-13)
    if val >= 100:
        val //= 10
        exp += 1
    elif val < 10:  # log10 rounded up just below a power of ten (libcircllhist drops these as NaN)
        exp -= 1
        val = min(99, math.floor(value / 10.0**exp * 10 + 1e-13))
    return exp * 100 + val


def _bin_left_width(key: int) -> tuple[float, float]:
    if key == _ZERO_KEY:
        return 0.0, 0.0
    exp, val = divmod(key, 100)
    scale = 10.0**exp
    return val / 10.0 * scale, scale / 10.0


def bins_of(counts: dict[int, int]) -> list[tuple[float, float, int]]:
    """Non-empty bins in order as (left edge, width, count), libcircllhist's bucket view."""
    return [(*_bin_left_width(k), c) for k, c in sorted(counts.items()) if c]


# Most recorded values are small integers (milliseconds, bytes of small bodies): their
# bins are looked up instead of computed (0.7 us -> 0.15 us per record).
_SMALL_INT_KEYS = tuple(bin_key(v) for v in range(10_000))


class HistogramBins:
    """Counts per bin. One writer (the owning thread); readers take ``snapshot()``."""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = counts if counts is not None else {}

    def insert(self, value: float, count: int = 1) -> None:
        if type(value) is int and 0 <= value < 10_000:
            key = _SMALL_INT_KEYS[value]
        else:
            key = bin_key(value)
        counts = self.counts
        counts[key] = counts.get(key, 0) + count

    def snapshot(self) -> dict[int, int]:
        # dict.copy is a single C call: consistent even while the owner inserts.
        return self.counts.copy()

    def merge(self, other: dict[int, int]) -> None:
        counts = self.counts
        for k, c in other.items():
            counts[k] = counts.get(k, 0) + c

    @staticmethod
    def difference(new: dict[int, int], old: dict[int, int]) -> dict[int, int]:
        """``new - old`` for two snapshots of the same (only growing) bins."""
        out = {}
        for k, c in new.items():
            d = c - old.get(k, 0)
            if d:
                out[k] = d
        return out


class HistogramStatistics:
    """Quantiles, bucket counts, sample count and sum of one set of bins (Envoy's
    ``HistogramStatisticsImpl``). Quantiles are NaN when there are no samples."""

    __slots__ = ("computed_buckets", "computed_quantiles", "sample_count", "sample_sum", "supported_buckets")

    def __init__(self, counts: dict[int, int], supported_buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bins = bins_of(counts)
        self.supported_buckets = tuple(supported_buckets)
        self.sample_count = sum(c for _, _, c in bins)
        self.sample_sum = sum(_harmonic_midpoint(left, width) * c for left, width, c in bins)
        self.computed_quantiles = _approx_quantiles(bins, self.sample_count, SUPPORTED_QUANTILES)
        self.computed_buckets = [_count_below(bins, b) for b in self.supported_buckets]


def _harmonic_midpoint(left: float, width: float) -> float:
    if left == 0:
        return 0.0
    upper = left + width
    return 2 * left * upper / (left + upper)


def _approx_quantiles(bins: list[tuple[float, float, int]], total: int, qs: Iterable[float]) -> list[float]:
    """Type-1 quantiles over samples spread evenly inside their bins (see module docstring)."""
    if total == 0:
        return [math.nan for _ in qs]
    out = []
    i = 0
    below = 0  # samples in bins before bins[i]
    for q in qs:
        k = max(1, math.ceil(q * total))
        while below + bins[i][2] < k:
            below += bins[i][2]
            i += 1
        left, width, count = bins[i]
        out.append(left + (k - below) / (count + 1) * width)
    return out


def _count_below(bins: list[tuple[float, float, int]], threshold: float) -> int:
    """Samples in bins whose left edge is <= threshold (Prometheus ``le`` buckets)."""
    running = 0
    for left, _, count in bins:
        if left <= threshold:
            running += count
        else:
            break
    return running
