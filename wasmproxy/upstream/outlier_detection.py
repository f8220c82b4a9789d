"""Outlier detection (cluster.outlier_detection): consecutive 5xx / gateway-failure ejection.

As Envoy's DetectorImpl: workers count each host's consecutive 5xx (and 502/503/504)
answers on the Host itself — resets and connect failures count as 503, Envoy's
non-split mode — and only when a count reaches its threshold do they post the event
to the main thread. There the host is ejected (the load balancers skip it) unless
that would put more than max_ejection_percent of the cluster out (with
always_eject_one_host, the first ejection is always allowed); every `interval` the detector brings back hosts whose ejection
time (base_ejection_time x times ejected, capped at max_ejection_time) has passed.
Success-rate and failure-percentage ejection are not implemented.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .host import Host


def _ms(duration: Any, default: int) -> int:
    return duration.seconds * 1000 + duration.nanos // 1_000_000 if duration.ByteSize() else default


def _value(proto: Any, field: str, default: int) -> int:
    return getattr(proto, field).value if proto.HasField(field) else default


class OutlierDetector:
    """One cluster's detector. Created on main; `put_response` is called from any worker."""

    def __init__(
        self,
        proto: Any,
        main_dispatcher: Any,
        store: Any,
        stat_prefix: str,
        hosts: Callable[[], tuple["Host", ...]],
        on_change: Callable[[], None],
    ) -> None:
        self._dispatcher = main_dispatcher
        self._store = store
        self._prefix = stat_prefix + "outlier_detection."
        self._hosts = hosts
        self._on_change = on_change
        self.consecutive_5xx = _value(proto, "consecutive_5xx", 5)
        self.consecutive_gateway_failure = _value(proto, "consecutive_gateway_failure", 5)
        self.enforcing_5xx = _value(proto, "enforcing_consecutive_5xx", 100)
        self.enforcing_gateway = _value(proto, "enforcing_consecutive_gateway_failure", 0)
        self.interval_ms = _ms(proto.interval, 10_000)
        self.base_ejection_ms = _ms(proto.base_ejection_time, 30_000)
        self.max_ejection_ms = max(_ms(proto.max_ejection_time, 300_000), self.base_ejection_ms)
        self.max_ejection_percent = _value(proto, "max_ejection_percent", 10)
        self.always_eject_one_host = proto.always_eject_one_host.value if proto.HasField("always_eject_one_host") else False
        self._rng = random.Random()
        self._timer = main_dispatcher.create_timer(self._on_interval)
        self._timer.enable_timer(self.interval_ms)

    # -- any worker --------------------------------------------------------------------------

    def put_response(self, host: "Host", status: int) -> None:
        """Count one upstream answer (or 503 for a reset / connect failure) for `host`."""
        if status >= 500:
            host.outlier_5xx += 1
            gateway = status in (502, 503, 504)
            if gateway:
                host.outlier_gateway += 1
            else:
                host.outlier_gateway = 0
            if host.outlier_5xx == self.consecutive_5xx:
                self._dispatcher.post(lambda: self._on_consecutive(host, "consecutive_5xx"))
            elif gateway and host.outlier_gateway == self.consecutive_gateway_failure:
                self._dispatcher.post(lambda: self._on_consecutive(host, "consecutive_gateway_failure"))
        else:
            host.outlier_5xx = host.outlier_gateway = 0

    # -- main thread --------------------------------------------------------------------------

    def _on_consecutive(self, host: "Host", kind: str) -> None:
        host.outlier_5xx = host.outlier_gateway = 0
        if host.ejected_at is not None or host not in self._hosts():
            return
        self._store.counter(self._prefix + f"ejections_detected_{kind}").inc()
        enforcing = self.enforcing_5xx if kind == "consecutive_5xx" else self.enforcing_gateway
        if self._rng.randrange(100) >= enforcing:
            return
        hosts = self._hosts()
        ejected = sum(1 for h in hosts if h.ejected_at is not None)
        within = (ejected + 1) * 100 <= self.max_ejection_percent * len(hosts)
        if not within and not (ejected == 0 and self.always_eject_one_host):
            self._store.counter(self._prefix + "ejections_overflow").inc()
            return
        host.ejected_at = self._dispatcher.time_source.monotonic()
        host.times_ejected += 1
        self._store.counter(self._prefix + "ejections_enforced_total").inc()
        self._store.counter(self._prefix + f"ejections_enforced_{kind}").inc()
        # Envoy still counts its deprecated totals too.
        self._store.counter(self._prefix + "ejections_total").inc()
        self._store.counter(self._prefix + f"ejections_{kind}").inc()
        self._publish()

    def _on_interval(self) -> None:
        now = self._dispatcher.time_source.monotonic()
        changed = False
        for host in self._hosts():
            if host.ejected_at is None:
                continue
            duration_ms = min(self.base_ejection_ms * host.times_ejected, self.max_ejection_ms)
            if (now - host.ejected_at) * 1000 >= duration_ms:
                host.ejected_at = None
                changed = True
        if changed:
            self._publish()
        self._timer.enable_timer(self.interval_ms)

    def _publish(self) -> None:
        self._store.gauge(self._prefix + "ejections_active").set(
            sum(1 for h in self._hosts() if h.ejected_at is not None))
        self._on_change()

    def stop(self) -> None:
        self._timer.disable_timer()
