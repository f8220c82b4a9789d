"""Envoy admin's stats output formats: ``/stats`` text and JSON, ``/stats/prometheus``.

Shapes checked line by line against Envoy 1.40's admin:

* text: counters and gauges together sorted by name (``name: value``), then
  histograms sorted by name as ``name: P0(interval,cumulative) P25(...) ...``
  or ``name: No recorded values``;
* JSON: ``{"stats":[{"name":..,"value":..},...,{"histograms":{"supported_quantiles":
  [...],"computed_quantiles":[{"name":..,"values":[{"cumulative":..,"interval":..}]}]}}]}``
  with ``null`` for NaN, the histograms element only when there are histograms;
* Prometheus: a ``# TYPE`` line per metric family, counters then gauges then
  histograms, families sorted by name, labels from Envoy's default tag
  extraction, histograms as cumulative ``_bucket{le=..}``, ``_sum`` (``%.32g``)
  and ``_count``; samples with no labels still print ``{}``.

``histogram_buckets`` (:class:`HistogramBuckets`) switches histograms to
``B<bound>(interval,cumulative)`` counts (cumulative or disjoint), to the
``detailed`` bin dump, or for Prometheus to a ``summary`` family of interval
quantiles, again as Envoy 1.40 prints them. JSON numbers are written as Envoy
writes doubles (shortest round-trip; the shorter of fixed and exponent form,
so 300000 is ``3e+05``).

Histograms show the state of the last :meth:`StatsRegistry.flush`, as Envoy's
admin does between stats flushes.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from wasmproxy.stats.histogram import SUPPORTED_QUANTILES, bins_of
from wasmproxy.stats.registry import MergedHistogram, StatsRegistry
from wasmproxy.stats.tags import extract_tags, prometheus_label, prometheus_name

__all__ = [
    "HistogramBuckets",
    "StatType",
    "StatsFilter",
    "format_double",
    "render_json",
    "render_prometheus",
    "render_text",
]

_QUANTILE_LABELS = [f"P{100 * q:g}" for q in SUPPORTED_QUANTILES]
_LE_INF = 'le="+Inf"'


class StatType(enum.Enum):
    """Admin ``type=`` values."""

    ALL = "All"
    COUNTERS = "Counters"
    GAUGES = "Gauges"
    HISTOGRAMS = "Histograms"
    TEXT_READOUTS = "TextReadouts"


class HistogramBuckets(enum.Enum):
    """Admin ``histogram_buckets=`` values (``summary`` is the default)."""

    SUMMARY = "summary"
    CUMULATIVE = "cumulative"
    DISJOINT = "disjoint"
    DETAILED = "detailed"


@dataclass(frozen=True, slots=True)
class StatsFilter:
    """Admin query parameters that select stats: ``usedonly``, ``filter`` (regex search), ``type``."""

    used_only: bool = False
    regex: re.Pattern[str] | None = None
    invert: bool = False
    type: StatType = StatType.ALL

    def wants(self, name: str, used: bool) -> bool:
        if self.used_only and not used:
            return False
        if self.regex is not None and (self.regex.search(name) is None) != self.invert:
            return False
        return True


def format_double(v: float) -> str:
    """A double as fmt's ``{}`` prints it: shortest round-trip, no trailing ``.0``, ``nan``."""
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r


class _Raw(str):
    """A JSON fragment written as is (an Envoy-formatted number)."""


def _json_double(v: float) -> _Raw | None:
    """A double as Envoy's JSON writer prints it (std::to_chars shortest); NaN is null."""
    v = float(v)
    if math.isnan(v):
        return None
    if v == 0:
        return _Raw("0")
    sign, digits, exp = Decimal(repr(v)).normalize().as_tuple()
    assert isinstance(exp, int)
    ds = "".join(map(str, digits))
    point = len(ds) + exp  # position of the decimal point from the left of ds
    if exp >= 0:
        fixed = ds + "0" * exp
    elif point > 0:
        fixed = ds[:point] + "." + ds[point:]
    else:
        fixed = "0." + "0" * -point + ds
    e = point - 1
    sci = (ds[0] + ("." + ds[1:] if len(ds) > 1 else "")) + f"e{'+' if e >= 0 else '-'}{abs(e):02d}"
    out = sci if len(sci) < len(fixed) else fixed
    return _Raw(("-" if sign else "") + out)


def _dump(value: object) -> str:
    """Compact JSON, with _Raw numbers spliced in verbatim."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value)


def _scalars(registry: StatsRegistry, f: StatsFilter) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    if f.type in (StatType.ALL, StatType.COUNTERS):
        out += [(n, v) for n, (v, used) in registry.counters().items() if f.wants(n, used)]
    if f.type in (StatType.ALL, StatType.GAUGES):
        out += [(n, v) for n, (v, used) in registry.gauges().items() if f.wants(n, used)]
    out.sort()
    return out


def _histograms(registry: StatsRegistry, f: StatsFilter) -> list[MergedHistogram]:
    if f.type not in (StatType.ALL, StatType.HISTOGRAMS):
        return []
    hs = [h for n, h in registry.histograms().items() if f.wants(n, h.cumulative.sample_count > 0)]
    hs.sort(key=lambda h: h.name)
    return hs


def _summary(h: MergedHistogram) -> str:
    return " ".join(
        f"{label}({format_double(i)},{format_double(c)})"
        for label, i, c in zip(_QUANTILE_LABELS, h.interval.computed_quantiles, h.cumulative.computed_quantiles,
                               strict=True)
    )


def _disjoint(counts: list[int]) -> list[int]:
    return [c - (counts[i - 1] if i else 0) for i, c in enumerate(counts)]


def _bucket_pairs(h: MergedHistogram, mode: HistogramBuckets) -> list[tuple[float, int, int]]:
    """(upper bound, interval count, cumulative count) per supported bucket."""
    interval, cumulative = h.interval.computed_buckets, h.cumulative.computed_buckets
    if mode is HistogramBuckets.DISJOINT:
        interval, cumulative = _disjoint(interval), _disjoint(cumulative)
    return list(zip(h.cumulative.supported_buckets, interval, cumulative, strict=True))


def _bins_text(counts: dict[int, int]) -> str:
    return ", ".join(f"{format_double(left)},{format_double(width)}:{c}" for left, width, c in bins_of(counts))


def render_text(registry: StatsRegistry, f: StatsFilter, buckets: HistogramBuckets = HistogramBuckets.SUMMARY) -> str:
    """``/stats`` plain text."""
    lines = [f"{name}: {value}" for name, value in _scalars(registry, f)]
    for h in _histograms(registry, f):
        if h.cumulative.sample_count == 0:
            lines.append(f"{h.name}: No recorded values")
        elif buckets is HistogramBuckets.SUMMARY:
            lines.append(f"{h.name}: {_summary(h)}")
        elif buckets is HistogramBuckets.DETAILED:
            lines += [
                f"{h.name}:",
                f"  totals={_bins_text(h.cumulative_bins)}",
                f"  intervals={_bins_text(h.interval_bins)}",
                f"  summary={_summary(h)}",
            ]
        else:
            parts = [f"B{bound:g}({i},{c})" for bound, i, c in _bucket_pairs(h, buckets)]
            lines.append(f"{h.name}: {' '.join(parts)}")
    return "".join(line + "\n" for line in lines)


def _percentiles(h: MergedHistogram) -> list[dict[str, object]]:
    return [
        {"cumulative": _json_double(c), "interval": _json_double(i)}
        for i, c in zip(h.interval.computed_quantiles, h.cumulative.computed_quantiles, strict=True)
    ]


def _bins_json(counts: dict[int, int]) -> list[dict[str, object]]:
    return [
        {"lower_bound": _json_double(left), "width": _json_double(width), "count": c}
        for left, width, c in bins_of(counts)
    ]


def render_json(registry: StatsRegistry, f: StatsFilter, buckets: HistogramBuckets = HistogramBuckets.SUMMARY) -> str:
    """``/stats?format=json``."""
    stats: list[object] = [{"name": n, "value": v} for n, v in _scalars(registry, f)]
    hs = _histograms(registry, f)
    supported = [_json_double(100 * q) for q in SUPPORTED_QUANTILES]
    if hs and buckets is HistogramBuckets.SUMMARY:
        stats.append({"histograms": {
            "supported_quantiles": supported,
            "computed_quantiles": [{"name": h.name, "values": _percentiles(h)} for h in hs],
        }})
    elif hs and buckets is HistogramBuckets.DETAILED:
        stats.append({"histograms": {
            "supported_percentiles": supported,
            "details": [
                {"name": h.name, "totals": _bins_json(h.cumulative_bins), "intervals": _bins_json(h.interval_bins),
                 "percentiles": _percentiles(h)}
                for h in hs
            ],
        }})
    elif hs:
        stats.append({"histograms": [
            {"name": h.name, "buckets": [
                {"upper_bound": _json_double(bound), "interval": i, "cumulative": c}
                for bound, i, c in _bucket_pairs(h, buckets)
            ]}
            for h in hs
        ]})
    return _dump({"stats": stats})


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(tags: Iterable[tuple[str, str]], extra: str = "") -> str:
    parts = [f'{prometheus_label(k)}="{_escape_label_value(v)}"' for k, v in tags]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _families(names: Iterable[str]) -> dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]]:
    """Prometheus family name -> [(stat name, tags)], for the names that have one."""
    fam: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for name in names:
        extracted, tags = extract_tags(name)
        metric = prometheus_name(extracted)
        if metric is not None:
            fam.setdefault(metric, []).append((name, tags))
    return fam


def render_prometheus(registry: StatsRegistry, f: StatsFilter, summary: bool = False) -> str:
    """``/stats/prometheus`` (text exposition format 0.0.4); ``summary`` for
    ``histogram_buckets=summary`` (interval quantiles, as Envoy)."""
    out: list[str] = []
    for kind, values in (
        ("counter", {n: v for n, (v, used) in registry.counters().items() if f.wants(n, used)}),
        ("gauge", {n: v for n, (v, used) in registry.gauges().items() if f.wants(n, used)}),
    ):
        fams = _families(sorted(values))
        for metric in sorted(fams):
            out.append(f"# TYPE {metric} {kind}\n")
            for name, tags in fams[metric]:
                out.append(f"{metric}{_labels(tags)} {values[name]}\n")
    hists = {n: h for n, h in registry.histograms().items() if f.wants(n, h.cumulative.sample_count > 0)}
    fams = _families(sorted(hists))
    for metric in sorted(fams):
        out.append(f"# TYPE {metric} {'summary' if summary else 'histogram'}\n")
        for name, tags in fams[metric]:
            if summary:
                stats = hists[name].interval
                for q, v in zip(SUPPORTED_QUANTILES, stats.computed_quantiles, strict=True):
                    label = f'quantile="{q:g}"'
                    out.append(f"{metric}{_labels(tags, label)} {v:.32g}\n")
            else:
                stats = hists[name].cumulative
                for bound, count in zip(stats.supported_buckets, stats.computed_buckets, strict=True):
                    le = 'le="' + format_double(bound) + '"'
                    out.append(f"{metric}_bucket{_labels(tags, le)} {count}\n")
                out.append(f"{metric}_bucket{_labels(tags, _LE_INF)} {stats.sample_count}\n")
            out.append(f"{metric}_sum{_labels(tags)} {stats.sample_sum:.32g}\n")
            out.append(f"{metric}_count{_labels(tags)} {stats.sample_count}\n")
    return "".join(out)
