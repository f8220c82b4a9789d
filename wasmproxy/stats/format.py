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

from wasmproxy.stats.histogram import SUPPORTED_QUANTILES
from wasmproxy.stats.registry import MergedHistogram, StatsRegistry
from wasmproxy.stats.tags import extract_tags, prometheus_label, prometheus_name

__all__ = ["StatsFilter", "StatType", "format_double", "render_json", "render_prometheus", "render_text"]

_QUANTILE_LABELS = [f"P{100 * q:g}" for q in SUPPORTED_QUANTILES]
_LE_INF = 'le="+Inf"'


class StatType(enum.Enum):
    """Admin ``type=`` values."""

    ALL = "All"
    COUNTERS = "Counters"
    GAUGES = "Gauges"
    HISTOGRAMS = "Histograms"
    TEXT_READOUTS = "TextReadouts"


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


def _json_number(v: float) -> float | int | None:
    v = float(v)
    if math.isnan(v):
        return None
    return int(v) if v.is_integer() and abs(v) < 1e16 else v


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


def render_text(registry: StatsRegistry, f: StatsFilter) -> str:
    """``/stats`` plain text."""
    lines = [f"{name}: {value}" for name, value in _scalars(registry, f)]
    for h in _histograms(registry, f):
        if h.cumulative.sample_count == 0:
            lines.append(f"{h.name}: No recorded values")
            continue
        parts = [
            f"{label}({format_double(i)},{format_double(c)})"
            for label, i, c in zip(
                _QUANTILE_LABELS, h.interval.computed_quantiles, h.cumulative.computed_quantiles, strict=True
            )
        ]
        lines.append(f"{h.name}: {' '.join(parts)}")
    return "".join(line + "\n" for line in lines)


def render_json(registry: StatsRegistry, f: StatsFilter) -> str:
    """``/stats?format=json``."""
    stats: list[dict[str, object]] = [{"name": n, "value": v} for n, v in _scalars(registry, f)]
    hs = _histograms(registry, f)
    if hs:
        stats.append(
            {
                "histograms": {
                    "supported_quantiles": [_json_number(100 * q) for q in SUPPORTED_QUANTILES],
                    "computed_quantiles": [
                        {
                            "name": h.name,
                            "values": [
                                {"cumulative": _json_number(c), "interval": _json_number(i)}
                                for i, c in zip(
                                    h.interval.computed_quantiles, h.cumulative.computed_quantiles, strict=True
                                )
                            ],
                        }
                        for h in hs
                    ],
                }
            }
        )
    return json.dumps({"stats": stats}, separators=(",", ":"))


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


def render_prometheus(registry: StatsRegistry, f: StatsFilter) -> str:
    """``/stats/prometheus`` (text exposition format 0.0.4)."""
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
        out.append(f"# TYPE {metric} histogram\n")
        for name, tags in fams[metric]:
            stats = hists[name].cumulative
            for bound, count in zip(stats.supported_buckets, stats.computed_buckets, strict=True):
                le = 'le="' + format_double(bound) + '"'
                out.append(f"{metric}_bucket{_labels(tags, le)} {count}\n")
            out.append(f"{metric}_bucket{_labels(tags, _LE_INF)} {stats.sample_count}\n")
            out.append(f"{metric}_sum{_labels(tags)} {stats.sample_sum:.32g}\n")
            out.append(f"{metric}_count{_labels(tags)} {stats.sample_count}\n")
    return "".join(out)
