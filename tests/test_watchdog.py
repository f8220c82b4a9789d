"""GuardDog / WatchDog: miss, mega-miss and kill accounting, on simulated and on real time."""

from __future__ import annotations

import threading

import pytest

from wasmproxy.event import Dispatcher, SimulatedTimeSource
from wasmproxy.event.watchdog import GuardDog, WatchDog, WatchDogEvent
from wasmproxy.stats import Store

WAIT = 10.0


def counters(store: Store, *names: str) -> list[int]:
    return [store.counter(n).value for n in names]


def test_miss_and_megamiss_counted_once_per_silent_stretch() -> None:
    ts = SimulatedTimeSource()
    store = Store("guard_dog")
    events: list[tuple[WatchDogEvent, list[str]]] = []

    def record(event, threads, now):
        events.append((event, [name for name, _ in threads]))

    gd = GuardDog(
        store, "workers", miss_timeout_ms=200, megamiss_timeout_ms=1000, time_source=ts,
        actions=[(WatchDogEvent.MISS, record), (WatchDogEvent.MEGAMISS, record)],
    )
    dog = gd.create_watchdog("worker_0")
    names = ("workers.watchdog_miss", "server.worker_0.watchdog_miss",
             "workers.watchdog_mega_miss", "server.worker_0.watchdog_mega_miss")
    gd.step()  # consumes the initial touch
    ts.advance(0.150)
    gd.step()
    assert counters(store, *names) == [0, 0, 0, 0]
    ts.advance(0.100)  # 250 ms silent
    gd.step()
    gd.step()
    assert counters(store, *names) == [1, 1, 0, 0]
    ts.advance(0.800)  # 1050 ms silent
    gd.step()
    assert counters(store, *names) == [1, 1, 1, 1]
    assert events == [(WatchDogEvent.MISS, ["worker_0"]), (WatchDogEvent.MEGAMISS, ["worker_0"])]
    dog.touch()
    gd.step()
    ts.advance(0.250)
    gd.step()
    assert counters(store, *names) == [2, 2, 1, 1]


def test_touched_thread_is_never_counted() -> None:
    ts = SimulatedTimeSource()
    store = Store("guard_dog")
    gd = GuardDog(store, "workers", time_source=ts)
    dog = gd.create_watchdog("worker_0")
    for _ in range(20):
        dog.touch()
        ts.advance(0.150)
        gd.step()
    assert store.counter("workers.watchdog_miss").value == 0


def test_kill_after_kill_timeout_and_off_by_default() -> None:
    ts = SimulatedTimeSource()
    killed: list[str] = []
    gd = GuardDog(Store(), "workers", kill_timeout_ms=0, time_source=ts,
                  kill_action=lambda dog, silent: killed.append(dog.thread_name))
    gd.create_watchdog("worker_0")
    gd.step()
    ts.advance(60)
    gd.step()
    assert killed == []

    gd = GuardDog(Store(), "workers", kill_timeout_ms=2000, time_source=ts,
                  kill_action=lambda dog, silent: killed.append(dog.thread_name))
    gd.create_watchdog("worker_1")
    gd.step()
    ts.advance(1.5)
    gd.step()
    assert killed == []
    ts.advance(1.0)
    gd.step()
    assert killed == ["worker_1"]


def test_multikill_needs_two_threads_and_threshold() -> None:
    ts = SimulatedTimeSource()
    killed: list[str] = []
    gd = GuardDog(Store(), "workers", multikill_timeout_ms=1000, multikill_threshold=50, time_source=ts,
                  kill_action=lambda dog, silent: killed.append(dog.thread_name))
    dogs = [gd.create_watchdog(f"worker_{i}") for i in range(4)]
    gd.step()
    ts.advance(1.5)
    for d in dogs[1:]:
        d.touch()
    gd.step()
    assert killed == []  # one stuck thread is not a multikill
    ts.advance(1.5)
    dogs[2].touch()
    dogs[3].touch()
    gd.step()
    assert killed == ["worker_0"]


def test_blocked_worker_counted_by_guard_thread() -> None:
    """A real worker loop blocked on an Event past the miss interval is counted."""
    store = Store("guard_dog")
    missed = threading.Event()
    gd = GuardDog(store, "workers", miss_timeout_ms=30, megamiss_timeout_ms=10_000,
                  actions=[(WatchDogEvent.MISS, lambda e, threads, now: missed.set())])
    d = Dispatcher("worker_0")
    dog = gd.create_watchdog("worker_0", dispatcher=d)
    release = threading.Event()
    started = threading.Event()
    d.post(started.set)
    t = threading.Thread(target=d.run)
    t.start()
    gd.start()
    try:
        assert started.wait(WAIT)
        assert isinstance(dog, WatchDog)
        d.post(lambda: release.wait(WAIT))  # the worker is now stuck in a callback
        assert missed.wait(WAIT)
        assert store.counter("server.worker_0.watchdog_miss").value >= 1
        assert store.counter("workers.watchdog_miss").value >= 1
    finally:
        release.set()
        gd.stop()
        d.exit()
        t.join(WAIT)
        d.close()
    assert not t.is_alive()


def test_stop_watching_and_failing_action_and_double_start() -> None:
    ts = SimulatedTimeSource()
    store = Store("guard_dog")
    calls: list[str] = []

    def bad_action(event, threads, now):
        calls.append("bad")
        raise RuntimeError("action failed")

    def good_action(event, threads, now):
        calls.append("good")

    gd = GuardDog(store, "workers", time_source=ts,
                  actions=[(WatchDogEvent.MISS, bad_action), (WatchDogEvent.MISS, good_action)])
    dog = gd.create_watchdog("worker_0")
    gone = gd.create_watchdog("worker_1")
    gd.step()
    gd.stop_watching(gone)
    ts.advance(0.5)
    gd.step()
    assert calls == ["bad", "good"]  # a failing action is logged; the others still run
    assert store.counter("server.worker_0.watchdog_miss").value == 1
    assert store.counter("server.worker_1.watchdog_miss").value == 0
    gd.start()
    try:
        with pytest.raises(AssertionError, match="already started"):
            gd.start()
    finally:
        gd.stop()
    gd.stop()  # stopping twice is harmless
    assert isinstance(dog, WatchDog)


def test_default_kill_action_aborts(monkeypatch) -> None:
    import os

    from wasmproxy.event import watchdog

    aborted = []
    monkeypatch.setattr(os, "abort", lambda: aborted.append(True))
    watchdog.abort_process(WatchDog("worker_0", 1), 2.5)
    assert aborted == [True]


def test_idle_worker_with_registered_watchdog_is_not_counted() -> None:
    """The touch timer keeps an idle loop alive in the guard dog's eyes (no false misses).

    Without it the loop below would be silent for ~500 ms (its own timer does not
    touch), three times the miss timeout, and be counted once.
    """
    store = Store("guard_dog")
    d = Dispatcher("worker_0")
    gd = GuardDog(store, "workers", miss_timeout_ms=150, megamiss_timeout_ms=10_000)
    gd.create_watchdog("worker_0", dispatcher=d)
    idle_over = threading.Event()
    ticks = [0]
    timer: list = []

    def on_tick() -> None:
        ticks[0] += 1
        if ticks[0] == 25:  # 25 x 20 ms of idleness
            idle_over.set()
        else:
            timer[0].enable_timer(20)

    def arm() -> None:
        timer.append(d.create_timer(on_tick))
        timer[0].enable_timer(20)

    d.post(arm)
    t = threading.Thread(target=d.run)
    t.start()
    gd.start()
    try:
        assert idle_over.wait(WAIT)
    finally:
        gd.stop()
        d.exit()
        t.join(WAIT)
        d.close()
    assert store.counter("server.worker_0.watchdog_miss").value == 0
