"""ThreadLocal: publication to workers, completion callbacks, free with updates in flight, shutdown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from wasmproxy.event import Dispatcher
from wasmproxy.thread_local import ThreadLocalInstance

WAIT = 10.0


class Workers:
    """N worker dispatchers on their own threads, registered with a TLS instance on this (main) thread."""

    def __init__(self, n: int) -> None:
        self.main = Dispatcher("main_thread")
        self.tls = ThreadLocalInstance(self.main)
        self.dispatchers = [Dispatcher(f"worker_{i}") for i in range(n)]
        self.threads = [threading.Thread(target=d.run, name=d.name) for d in self.dispatchers]
        for d in self.dispatchers:
            self.tls.register_thread(d)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def on_worker(self, d: Dispatcher, fn):
        done = threading.Event()
        box = []

        def cb() -> None:
            try:
                box.append(fn())
            except BaseException as e:  # re-raised on the calling thread
                box.append(e)
            done.set()

        d.post(cb)
        assert done.wait(WAIT)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def run_main_until(self, predicate) -> None:
        """Drive the main dispatcher's loop (on this thread) until predicate() holds."""
        for _ in range(10_000):
            if predicate():
                return
            self.main.loop.run_until_complete(_tick())
        raise AssertionError("main loop never reached the condition")

    def stop(self) -> None:
        for d in self.dispatchers:
            d.exit()
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive()
        for d in self.dispatchers:
            d.close()
        self.main.close()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0)


@contextmanager
def workers(n: int) -> Iterator[Workers]:
    w = Workers(n)
    # The main dispatcher is driven by hand on this thread; bind it here.
    w.main.thread_id = threading.get_ident()
    w.start()
    try:
        yield w
    finally:
        w.stop()


def test_set_is_visible_on_every_worker_before_its_next_event() -> None:
    with workers(3) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda dispatcher: f"obj for {dispatcher.name}")
        assert slot.get() == "obj for main_thread"
        # The "next event" each worker handles after set(): it already sees its own object.
        for d in w.dispatchers:
            assert w.on_worker(d, slot.get) == f"obj for {d.name}"
            assert w.on_worker(d, lambda: w.tls.dispatcher) is d


def test_get_on_unset_slot_is_none() -> None:
    with workers(1) as w:
        slot = w.tls.allocate_slot()
        assert slot.get() is None
        assert w.on_worker(w.dispatchers[0], slot.get) is None
        seen = []
        t = threading.Thread(target=lambda: seen.append(slot.get()))  # unregistered thread: no error
        t.start()
        t.join(WAIT)
        assert seen == [None]


def test_run_on_all_threads_calls_complete_once_after_all() -> None:
    with workers(4) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda dispatcher: {"name": dispatcher.name, "updates": 0})
        ran_on: list[str] = []
        lock = threading.Lock()
        completes: list[list[str]] = []
        gate = threading.Event()
        # Hold one worker so the completion cannot come early.
        w.dispatchers[0].post(gate.wait)

        def update(obj) -> None:
            obj["updates"] += 1
            with lock:
                ran_on.append(obj["name"])

        slot.run_on_all_threads(update, lambda: completes.append(sorted(ran_on)))
        assert ran_on == ["main_thread"]  # main runs first, synchronously
        w.run_main_until(lambda: len(ran_on) == 4)
        assert completes == []
        gate.set()
        w.run_main_until(lambda: completes)
        for _ in range(20):  # more main loop turns: complete_cb must not run again
            w.main.loop.run_until_complete(_tick())
        assert completes == [sorted(["main_thread"] + [d.name for d in w.dispatchers])]
        for d in w.dispatchers:
            assert w.on_worker(d, lambda: slot.get()["updates"]) == 1


def test_run_on_all_threads_without_workers_still_completes_on_main() -> None:
    with workers(0) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda d: [0])
        done = []
        slot.run_on_all_threads(lambda obj: obj.__setitem__(0, 1), lambda: done.append(True))
        w.run_main_until(lambda: done)
        assert slot.get() == [1]


def test_free_with_updates_in_flight_is_safe() -> None:
    with workers(2) as w:
        slot = w.tls.allocate_slot()
        gate = threading.Event()
        for d in w.dispatchers:
            d.post(gate.wait)
        calls: list[str] = []
        slot.set(lambda d: calls.append(f"init {d.name}") or object())
        slot.run_on_all_threads(lambda obj: calls.append("update"), lambda: calls.append("complete"))
        slot.free()
        # A new slot may reuse the index; the old in-flight set must not land in it.
        slot2 = w.tls.allocate_slot()
        slot2.set(lambda d: f"new {d.name}")
        gate.set()
        for d in w.dispatchers:
            assert w.on_worker(d, slot2.get) == f"new {d.name}"
        for _ in range(20):
            w.main.loop.run_until_complete(_tick())
        # Only main ran (synchronously, before free); the workers skipped the freed slot's work.
        assert calls == ["init main_thread", "update"]
        with pytest.raises(AssertionError, match="after free"):
            slot.set(lambda d: 1)


def test_freed_slot_is_cleared_on_workers() -> None:
    with workers(1) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda d: "x")
        index = slot._index
        slot.free()
        d = w.dispatchers[0]
        assert w.on_worker(d, lambda: w.tls._get_thread_local(index)) is None
        assert w.tls._get_thread_local(index) is None


@dataclass(frozen=True)
class Config:
    version: int
    doubled: int
    text: str


def test_published_multi_field_state_is_never_torn_under_load() -> None:
    n_workers, updates, requests_per_update = 4, 300, 5
    with workers(n_workers) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda d: Config(0, 0, "0"))
        bad: list[object] = []
        last_seen: dict[str, int] = {}

        def request(name: str) -> None:
            # A "request": reads the config twice, as a filter chain would across callbacks.
            cfg = slot.get()
            again = slot.get()
            if cfg is not again or cfg.doubled != 2 * cfg.version or cfg.text != str(cfg.version):
                bad.append(cfg)
            if cfg.version < last_seen.get(name, 0):
                bad.append(("went back", name, cfg.version))
            last_seen[name] = cfg.version

        stop = threading.Event()

        def load(d: Dispatcher) -> None:
            # Another thread floods the worker with requests while main publishes.
            for _ in range(updates * requests_per_update):
                if stop.is_set():
                    return
                d.post(lambda: request(d.name))

        loaders = [threading.Thread(target=load, args=(d,)) for d in w.dispatchers]
        for t in loaders:
            t.start()
        for v in range(1, updates + 1):
            slot.set(lambda d, v=v: Config(v, 2 * v, str(v)))
        for t in loaders:
            t.join(WAIT)
        stop.set()
        for d in w.dispatchers:
            assert w.on_worker(d, lambda: slot.get().version) == updates
        assert bad == []


def test_thread_asserts_and_shutdown_order() -> None:
    with workers(1) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda d: "v")
        d = w.dispatchers[0]
        with pytest.raises(AssertionError, match="main thread only"):
            w.on_worker(d, w.tls.allocate_slot)
        with pytest.raises(AssertionError, match="before shutdown_global_threading"):
            w.tls.shutdown_thread()
        w.tls.shutdown_global_threading()
        with pytest.raises(AssertionError, match="shut down"):
            slot.set(lambda d: "w")
        assert w.on_worker(d, lambda: (w.tls.shutdown_thread(), slot.get())[1]) is None
        assert slot.get() == "v"  # main still holds its object until its own shutdown_thread
        w.tls.shutdown_thread()
        assert slot.get() is None


def test_registration_visibility_and_shutdown_edges() -> None:
    with workers(1) as w:
        d = w.dispatchers[0]
        assert w.tls.current_thread_registered()
        assert w.on_worker(d, w.tls.current_thread_registered)
        seen = []
        t = threading.Thread(target=lambda: seen.append(w.tls.current_thread_registered()))
        t.start()
        t.join(WAIT)
        assert seen == [False]
        slot = w.tls.allocate_slot()
        assert slot.current_thread_registered()
        slot.free()
        slot.free()  # a second free is harmless
        other = w.tls.allocate_slot()
        assert not w.tls.is_shutdown
        w.tls.shutdown_global_threading()
        assert w.tls.is_shutdown
        other.free()  # after shutdown: nothing posted to workers that are going away
        with pytest.raises(AssertionError, match="twice"):
            w.tls.shutdown_global_threading()


def test_updates_skip_a_worker_that_already_exited() -> None:
    with workers(2) as w:
        slot = w.tls.allocate_slot()
        slot.set(lambda d: [d.name])
        gone = w.dispatchers[1]
        gone.exit()
        w.threads[1].join(WAIT)
        slot.set(lambda d: [d.name, "v2"])  # no DispatcherExitedError out of set()
        done = []
        slot.run_on_all_threads(lambda obj: None, lambda: done.append(True))
        w.run_main_until(lambda: done)
        assert done == [True]
        assert w.on_worker(w.dispatchers[0], slot.get) == ["worker_0", "v2"]
        slot.free()
