"""Stats: per-thread Stores, the main-thread registry that merges them, and Envoy's admin formats."""

from wasmproxy.stats.format import (
    HistogramBuckets,
    StatsFilter,
    StatType,
    render_json,
    render_prometheus,
    render_text,
)
from wasmproxy.stats.registry import MergedHistogram, StatsRegistry
from wasmproxy.stats.store import Counter, Gauge, Histogram, ImportMode, Store, Unit
from wasmproxy.stats.tags import extract_tags, prometheus_name

__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "HistogramBuckets",
    "ImportMode",
    "MergedHistogram",
    "StatType",
    "StatsFilter",
    "StatsRegistry",
    "Store",
    "Unit",
    "extract_tags",
    "prometheus_name",
    "render_json",
    "render_prometheus",
    "render_text",
]
