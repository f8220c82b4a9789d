"""Stats: per-thread Stores, the main-thread registry that merges them, and Envoy's admin formats."""

from wasmproxy.stats.store import Counter, Gauge, Histogram, ImportMode, Store, Unit

__all__ = ["Counter", "Gauge", "Histogram", "ImportMode", "Store", "Unit"]
