"""Clusters reach real worker threads through the ClusterManager's ThreadLocal slot, socket-free.

A main dispatcher and two worker dispatchers run on their own threads with the real
ThreadLocalInstance; DNS is the cluster's injectable resolver. The test thread only posts and
waits on events (bounded), so every observation is ordered after the update it checks: posts
to one dispatcher run in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from test_upstream_support import cluster
from wasmproxy.event.dispatcher import Dispatcher
from wasmproxy.stats.store import Store
from wasmproxy.thread_local import ThreadLocalInstance
from wasmproxy.upstream.cluster_manager import ClusterManager

WAIT_S = 10.0


def dns_cluster(hostname: str, refresh: str = "0.05s", extra: str = "") -> Any:
    return cluster(f"""
name: dns
type: STRICT_DNS
dns_refresh_rate: {refresh}
load_assignment:
  cluster_name: dns
  endpoints:
  - lb_endpoints:
    - endpoint: {{address: {{socket_address: {{address: {hostname}, port_value: 8080}}}}}}
{extra}""")


class Resolver:
    """The cluster's resolver: answers from `answers`; a name in `gated` waits for its gate."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.gates: dict[str, asyncio.Event] = {}  # created and set on main's loop
        self.served: dict[str, threading.Event] = {}

    def served_event(self, name: str, answer: list[str]) -> threading.Event:
        """Set once `answer` has been returned for `name` (the publish follows in the same step)."""
        event = self.served[f"{name}={answer}"] = threading.Event()
        return event

    async def __call__(self, name: str, port: int, family: int) -> list[str]:
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        answer = list(self.answers[name])
        event = self.served.get(f"{name}={answer}")
        if event is not None:
            event.set()
        return answer


class Threads:
    """Main plus two workers on real threads, with a ClusterManager built on main."""

    def __init__(self, protos: list[Any], resolver: Resolver) -> None:
        self.ready = threading.Event()
        self.initialized = threading.Event()
        self.error: BaseException | None = None
        self._protos, self._resolver = protos, resolver
        self.main: Dispatcher | None = None
        self.workers: list[Dispatcher] = []
        self.cm: ClusterManager | None = None
        self.store = Store()
        self._thread = threading.Thread(target=self._run_main, name="test-main", daemon=True)

    def _run_main(self) -> None:
        main = self.main = Dispatcher("main_thread")
        tls = ThreadLocalInstance(main)
        self.workers = [Dispatcher(f"worker_{i}") for i in range(2)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]
        for w in self.workers:
            tls.register_thread(w)
        for t in threads:
            t.start()
        try:
            self.cm = ClusterManager(self._protos, main, tls, self.store, resolver=self._resolver)
            main.post(lambda: self.cm.initialize(self.initialized.set) if self.cm else None)
            self.ready.set()
            main.run()
        except BaseException as e:  # surfaced by the test thread
            self.error = e
            self.ready.set()
        finally:
            tls.shutdown_global_threading()
            for w in self.workers:
                w.exit()
            for t in threads:
                t.join(WAIT_S)
            if self.cm is not None:
                self.cm.shutdown()
            tls.shutdown_thread()

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(WAIT_S) and self.error is None, self.error
        assert self.initialized.wait(WAIT_S)

    def stop(self) -> None:
        if self.main is not None:
            self.main.exit()
        self._thread.join(WAIT_S)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run fn on main and return its result."""
        assert self.main is not None
        done = threading.Event()
        out: list[Any] = []

        def run() -> None:
            out.append(fn())
            done.set()

        self.main.post(run)
        assert done.wait(WAIT_S)
        return out[0]

    def worker_hosts(self, name: str = "dns") -> list[list[str]]:
        """Each worker's view of cluster `name` (its host addresses), posted via main so it runs
        after every update main had posted before."""
        results: list[list[str]] = [[] for _ in self.workers]
        events = [threading.Event() for _ in self.workers]
        cm = self.cm
        assert cm is not None

        def post_checks() -> None:
            for i, w in enumerate(self.workers):

                def check(i: int = i) -> None:
                    tlc = cm.thread_local().get(name)
                    results[i] = [str(h.address) for h in tlc.hosts] if tlc is not None else ["<none>"]
                    events[i].set()

                w.post(check)

        self.on_main(post_checks)
        assert all(e.wait(WAIT_S) for e in events)
        return results


@pytest.fixture
def resolver() -> Resolver:
    return Resolver({"svc.local": ["10.0.0.1", "10.0.0.2"]})


@pytest.fixture
def threads(resolver: Resolver) -> Iterator[Threads]:
    t = Threads([dns_cluster("svc.local")], resolver)
    t.start()
    yield t
    t.stop()


def test_dns_re_resolution_pushes_new_hosts_to_every_worker(threads: Threads, resolver: Resolver) -> None:
    assert threads.worker_hosts() == [["10.0.0.1:8080", "10.0.0.2:8080"]] * 2
    served = resolver.served_event("svc.local", ["10.0.0.3"])
    resolver.answers["svc.local"] = ["10.0.0.3"]  # the next dns_refresh_rate tick answers this
    assert served.wait(WAIT_S)
    assert threads.worker_hosts() == [["10.0.0.3:8080"]] * 2
    assert threads.on_main(lambda: threads.store.counter("cluster.dns.membership_change").value) == 2


def test_a_changed_cluster_warms_while_the_old_one_serves(threads: Threads, resolver: Resolver) -> None:
    cm = threads.cm
    assert cm is not None
    resolver.answers["svc2.local"] = ["10.0.0.9"]
    active = threading.Event()

    def update() -> None:
        resolver.gates["svc2.local"] = asyncio.Event()
        cm.add_or_update_cluster(cm.build_cluster(dns_cluster("svc2.local", refresh="5s")), active.set)

    threads.on_main(update)
    # Still warming (its first lookup is held): every worker keeps the old hosts.
    assert threads.worker_hosts() == [["10.0.0.1:8080", "10.0.0.2:8080"]] * 2
    assert threads.on_main(lambda: threads.store.gauge("cluster_manager.warming_clusters").value) == 1
    threads.on_main(lambda: resolver.gates["svc2.local"].set())
    assert active.wait(WAIT_S)
    assert threads.worker_hosts() == [["10.0.0.9:8080"]] * 2
    stats = threads.on_main(lambda: (threads.store.counter("cluster_manager.cluster_modified").value,
                                     threads.store.gauge("cluster_manager.warming_clusters").value))
    assert stats == (1, 0)
    # Removal drops it on every thread.
    threads.on_main(lambda: cm.remove_cluster("dns"))
    assert threads.worker_hosts() == [["<none>"]] * 2
    assert threads.on_main(lambda: threads.store.counter("cluster_manager.cluster_removed").value) == 1
