"""Per-worker load balancers over one host set: ROUND_ROBIN, RANDOM, LEAST_REQUEST, RING_HASH/MAGLEV.

Each worker builds its own balancer from the host set the main thread published,
so picking a host takes no lock (Envoy: one LB per ThreadLocalCluster). Hosts are
chosen among healthy ones unless fewer than the cluster's healthy panic threshold
(common_lb_config, 50% by default) are healthy, in which case all hosts are used.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Sequence

from .host import Host

HEALTHY_PANIC_THRESHOLD = 0.5


class LoadBalancer:
    """Base: keeps the candidate list and applies the healthy-panic rule."""

    def __init__(self, hosts: Sequence[Host], rng: random.Random | None = None,
                 panic_threshold: float = HEALTHY_PANIC_THRESHOLD) -> None:
        self.hosts = tuple(hosts)
        healthy = tuple(h for h in self.hosts if h.available)
        self.panic = bool(self.hosts) and len(healthy) < panic_threshold * len(self.hosts)
        self._candidates = self.hosts if self.panic else healthy
        self._weighted = len({h.weight for h in self._candidates}) > 1
        self._rng = rng or random.Random()

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        """A host; `hash_key` is the request hash consistent-hashing balancers use."""
        if not self._candidates:
            return None
        return self._pick(self._candidates)

    def _pick(self, hosts: tuple[Host, ...]) -> Host:
        raise NotImplementedError


class RoundRobinLoadBalancer(LoadBalancer):
    """Plain rotation; with unequal weights, smooth weighted round robin (same long-run shares as Envoy's EDF)."""

    def __init__(self, hosts: Sequence[Host], rng: random.Random | None = None,
                 panic_threshold: float = HEALTHY_PANIC_THRESHOLD) -> None:
        super().__init__(hosts, rng, panic_threshold)
        self._index = 0
        self._current = [0] * len(self._candidates)

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        hosts = self._candidates
        if not hosts:
            return None
        if self._weighted:
            return self._pick(hosts)
        host = hosts[self._index % len(hosts)]  # _pick's plain rotation, without the call
        self._index += 1
        return host

    def _pick(self, hosts: tuple[Host, ...]) -> Host:
        if not self._weighted:
            host = hosts[self._index % len(hosts)]
            self._index += 1
            return host
        total = 0
        best = 0
        for i, h in enumerate(hosts):
            self._current[i] += h.weight
            total += h.weight
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= total
        return hosts[best]


class RandomLoadBalancer(LoadBalancer):
    def _pick(self, hosts: tuple[Host, ...]) -> Host:
        if not self._weighted:
            return hosts[self._rng.randrange(len(hosts))]
        return self._rng.choices(hosts, weights=[h.weight for h in hosts])[0]


class LeastRequestLoadBalancer(LoadBalancer):
    """Power of `choice_count` random choices on active requests (Envoy's default for equal weights)."""

    def __init__(self, hosts: Sequence[Host], rng: random.Random | None = None, choice_count: int = 2,
                 panic_threshold: float = HEALTHY_PANIC_THRESHOLD) -> None:
        super().__init__(hosts, rng, panic_threshold)
        self._choice_count = max(1, choice_count)

    def _pick(self, hosts: tuple[Host, ...]) -> Host:
        if self._weighted:
            # Envoy weighs by weight / (active + 1) when weights differ (active_request_bias 1.0).
            return self._rng.choices(hosts, weights=[h.weight / (h.stats.rq_active + 1) for h in hosts])[0]
        best = hosts[self._rng.randrange(len(hosts))]
        for _ in range(self._choice_count - 1):
            other = hosts[self._rng.randrange(len(hosts))]
            if other.stats.rq_active < best.stats.rq_active:
                best = other
        return best


def ring_points(hosts: Sequence[Host], min_ring_size: int) -> list[int]:
    """How many ring entries each host gets: its weighted share of the ring (at least one)."""
    total = sum(h.weight for h in hosts) or 1
    size = max(min_ring_size, len(hosts))
    return [max(1, round(size * h.weight / total)) for h in hosts]


class RingHashLoadBalancer(LoadBalancer):
    """Consistent hashing on a ring of weighted host points (RING_HASH, and MAGLEV with the same
    stickiness). Points hash "<address>_<i>" with 64-bit BLAKE2b, not Envoy's xxHash64, so a key
    maps to a stable host that may differ from Envoy's choice. No request hash: a random host."""

    def __init__(self, hosts: Sequence[Host], rng: random.Random | None = None, min_ring_size: int = 1024,
                 panic_threshold: float = HEALTHY_PANIC_THRESHOLD) -> None:
        super().__init__(hosts, rng, panic_threshold)
        ring: list[tuple[int, int]] = []
        for index, (host, points) in enumerate(zip(self._candidates, ring_points(self._candidates, min_ring_size))):
            for i in range(points):
                digest = hashlib.blake2b(f"{host.address}_{i}".encode(), digest_size=8).digest()
                ring.append((int.from_bytes(digest, "big"), index))
        ring.sort()
        self._ring_hashes = [h for h, _ in ring]
        self._ring_hosts = [i for _, i in ring]

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        if not self._candidates:
            return None
        if hash_key is None:
            return self._candidates[self._rng.randrange(len(self._candidates))]
        i = bisect.bisect_left(self._ring_hashes, hash_key)
        return self._candidates[self._ring_hosts[i % len(self._ring_hosts)]]


def create_load_balancer(
    policy: str, hosts: Sequence[Host], choice_count: int = 2, min_ring_size: int = 1024,
    panic_threshold: float = HEALTHY_PANIC_THRESHOLD,
) -> LoadBalancer:
    if policy in ("RING_HASH", "MAGLEV"):
        return RingHashLoadBalancer(hosts, min_ring_size=min_ring_size, panic_threshold=panic_threshold)
    if policy == "RANDOM":
        return RandomLoadBalancer(hosts, panic_threshold=panic_threshold)
    if policy == "LEAST_REQUEST":
        return LeastRequestLoadBalancer(hosts, choice_count=choice_count, panic_threshold=panic_threshold)
    return RoundRobinLoadBalancer(hosts, panic_threshold=panic_threshold)
