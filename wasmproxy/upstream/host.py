"""Host: one upstream endpoint of a cluster, shared by every worker (Envoy's HostImpl).

A Host is created on the main thread and handed to workers inside immutable host
sets; its per-host counters (`HostStats`) are written by every worker, as Envoy's
atomics are. Python int updates under the GIL can in rare cases lose an increment
across threads; these numbers feed admin `/clusters` only, never a decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..http.stream_info import Address


@dataclass(slots=True)
class HostStats:
    """Envoy's per-host stats, in the order admin `/clusters` prints them."""

    cx_connect_fail: int = 0
    cx_total: int = 0
    rq_error: int = 0
    rq_success: int = 0
    rq_timeout: int = 0
    rq_total: int = 0
    cx_active: int = 0
    rq_active: int = 0
    rq_pending_active: int = 0

    COUNTERS = ("cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total")
    GAUGES = ("cx_active", "rq_active", "rq_pending_active")


@dataclass(slots=True, eq=False)
class Host:
    """An endpoint: its address, the DNS name it came from, weight and health."""

    cluster_name: str
    address: Address
    hostname: str = ""
    weight: int = 1
    priority: int = 0
    healthy: bool = True
    metadata: dict = field(default_factory=dict)
    stats: HostStats = field(default_factory=HostStats)
    # Outlier detection: consecutive counts kept by workers; ejection state set on main.
    outlier_5xx: int = 0
    outlier_gateway: int = 0
    ejected_at: float | None = None
    times_ejected: int = 0

    @property
    def available(self) -> bool:
        """Healthy and not ejected: a load balancer's normal candidate."""
        return self.healthy and self.ejected_at is None

    @property
    def address_string(self) -> str:
        return str(self.address)

    def health_flags(self) -> str:
        """Admin's health_flags column ("healthy" or Envoy's failure flag names)."""
        if self.healthy and self.ejected_at is None:
            return "healthy"
        return ("" if self.healthy else "/failed_active_hc") + ("/failed_outlier_check" if self.ejected_at is not None else "")
