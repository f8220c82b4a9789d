"""Dispatcher: post ordering and loss, drain boundaries, timers, deferred delete, exit."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from wasmproxy.event import Dispatcher, DispatcherExitedError, SimulatedTimeSource
from wasmproxy.log import EnvoyFormatter, get_logger

WAIT = 10.0  # generous upper bound for event waits; tests finish far sooner


@contextmanager
def running(d: Dispatcher) -> Iterator[Dispatcher]:
    t = threading.Thread(target=d.run, name=d.name)
    t.start()
    try:
        yield d
    finally:
        d.exit()
        t.join(WAIT)
        assert not t.is_alive()
        d.close()


def post_and_wait(d: Dispatcher, fn=lambda: None):
    """Run ``fn`` on the dispatcher and return its result (a barrier: earlier posts have run)."""
    done = threading.Event()
    box = []

    def cb() -> None:
        box.append(fn())
        done.set()

    d.post(cb)
    assert done.wait(WAIT)
    return box[0]


class OwnedLock:
    """The dispatcher's queue lock, instrumented to tell which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()


def test_eight_producers_every_callback_once_in_per_producer_order_outside_lock() -> None:
    d = Dispatcher("worker_0")
    lock = OwnedLock()
    d._post_lock = lock  # type: ignore[assignment]
    producers, per_producer = 8, 10_000
    seen: list[tuple[int, int]] = []
    lock_held_inside = []

    def make(p: int, i: int):
        def cb() -> None:
            if lock.owner == threading.get_ident():
                lock_held_inside.append((p, i))
            seen.append((p, i))

        return cb

    start = threading.Barrier(producers)

    def produce(p: int) -> None:
        start.wait()
        for i in range(per_producer):
            d.post(make(p, i))

    with running(d):
        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        # Posted after every producer finished, so it runs after all their callbacks.
        post_and_wait(d)

    assert lock_held_inside == []
    assert len(seen) == producers * per_producer
    by_producer: dict[int, list[int]] = {p: [] for p in range(producers)}
    for p, i in seen:
        by_producer[p].append(i)
    for p in range(producers):
        assert by_producer[p] == list(range(per_producer))


def test_callback_posted_during_drain_runs_in_a_later_loop_iteration() -> None:
    d = Dispatcher("worker_0")
    order: list[str] = []
    done = threading.Event()

    def a() -> None:
        order.append("a")
        # Scheduled for the next loop iteration; a post that ran in this drain would beat it.
        d.loop.call_soon(lambda: order.append("next_iteration"))
        d.post(b)

    def b() -> None:
        order.append("b")
        done.set()

    with running(d):
        # Both in one drain: post under the lock only once the loop is idle.
        gate = threading.Event()
        d.post(gate.wait)
        d.post(a)
        d.post(lambda: order.append("a2"))
        gate.set()
        assert done.wait(WAIT)
    assert order == ["a", "a2", "next_iteration", "b"]


def test_wakeup_armed_only_when_queue_was_empty() -> None:
    d = Dispatcher("worker_0")
    armed = []
    real = d.loop.call_soon_threadsafe

    def counting(cb, *args):
        if getattr(cb, "__name__", "") == "_run_post_callbacks":
            armed.append(cb)
        return real(cb, *args)

    d.loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    for _ in range(5):
        d.post(lambda: None)
    assert len(armed) == 1
    with running(d):
        post_and_wait(d)  # drains everything queued so far
        before = len(armed)
        post_and_wait(d)  # the queue is empty again: exactly one new wake-up
        assert len(armed) == before + 1


def test_raising_callback_is_logged_with_dispatcher_name_and_loop_continues() -> None:
    d = Dispatcher("worker_7")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(EnvoyFormatter())
    logger = get_logger("main")
    logger.addHandler(handler)
    try:
        with running(d):

            def boom() -> None:
                raise ValueError("boom")

            d.post(boom)
            assert post_and_wait(d, lambda: "still running") == "still running"
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert "[error][main] dispatcher 'worker_7'" in text
    assert "ValueError: boom" in text


def test_post_after_exit_raises_and_work_posted_before_exit_still_runs() -> None:
    d = Dispatcher("worker_0")
    ran = []
    gate = threading.Event()
    t = threading.Thread(target=d.run)
    t.start()
    d.post(gate.wait)  # hold the loop so the next post is queued when exit() is called
    d.post(lambda: ran.append("before exit"))
    d.exit()
    with pytest.raises(DispatcherExitedError):
        d.post(lambda: ran.append("after exit"))
    gate.set()
    t.join(WAIT)
    assert not t.is_alive()
    d.close()
    assert ran == ["before exit"]


def test_thread_safety_checks() -> None:
    d = Dispatcher("worker_0")
    with running(d):
        assert post_and_wait(d, d.is_thread_safe) is True
        assert d.is_thread_safe() is False
        with pytest.raises(AssertionError, match="worker_0"):
            d.assert_thread_safe()
        assert post_and_wait(d, lambda: d.thread_id == threading.get_ident())


def test_timer_enable_disable_and_rearm() -> None:
    d = Dispatcher("worker_0")
    fired = threading.Event()
    count = []

    with running(d):

        def setup():
            timer = d.create_timer(lambda: (count.append(1), fired.set()))
            assert not timer.enabled()
            timer.enable_timer(0)
            assert timer.enabled()
            return timer

        timer = post_and_wait(d, setup)
        assert fired.wait(WAIT)
        assert post_and_wait(d, timer.enabled) is False

        def disabled_before_fire():
            timer.enable_timer(0)
            timer.disable_timer()
            return timer.enabled()

        assert post_and_wait(d, disabled_before_fire) is False

        def rearm_pending() -> None:
            timer.enable_timer(60_000)  # far away ...
            timer.enable_timer(0)  # ... replaced: fires next iteration, once

        fired.clear()
        post_and_wait(d, rearm_pending)
        assert fired.wait(WAIT)
        # Two loop iterations later the cancelled timer still has not fired.
        post_and_wait(d)
        post_and_wait(d)
        assert count == [1, 1]
        with pytest.raises(AssertionError):
            timer.enable_timer(1)  # wrong thread


def test_deferred_delete_runs_after_current_callback_before_next_drain() -> None:
    d = Dispatcher("worker_0")
    events: list[str] = []

    class Conn:
        def on_deferred_delete(self) -> None:
            events.append("deleted")

    def cb() -> None:
        d.deferred_delete(Conn())
        events.append("callback continues")

    with running(d):
        post_and_wait(d, cb)
        post_and_wait(d, lambda: events.append("next drain"))
    assert events == ["callback continues", "deleted", "next drain"]


def test_watchdog_touched_before_each_post_callback() -> None:
    touched = []
    d = Dispatcher("worker_0", watchdog_touch=lambda: touched.append(True))
    flags = []

    def cb() -> None:
        flags.append(bool(touched))
        touched.clear()

    with running(d):
        gate = threading.Event()
        d.post(gate.wait)
        for _ in range(3):
            d.post(cb)
        gate.set()
        post_and_wait(d)
    assert flags == [True, True, True]


def test_statistics_snapshot_counts_queued_posts() -> None:
    d = Dispatcher("worker_3")
    for _ in range(3):
        d.post(lambda: None)
    stats = d.statistics()
    assert (stats.name, stats.thread_id, stats.pending_posts, stats.exited) == ("worker_3", None, 3, False)
    with running(d):
        post_and_wait(d)
        assert d.statistics().pending_posts == 0
    assert d.statistics().exited
    assert stats.pending_posts == 3  # a snapshot does not change


def test_time_source_is_overridable() -> None:
    ts = SimulatedTimeSource(monotonic=5.0)
    d = Dispatcher("worker_0", time_source=ts)
    assert d.time_source.monotonic() == 5.0
    ts.advance(1.5)
    assert d.time_source.monotonic() == 6.5
    assert d.time_source.system_time() == 1_800_000_001.5
    d.close()


def test_timer_with_delay_fires_after_it_and_rearms() -> None:
    d = Dispatcher("worker_0")
    fired: list[float] = []
    done = threading.Event()

    with running(d):

        def setup() -> float:
            def on_timer() -> None:
                fired.append(d.loop.time())
                if len(fired) < 2:
                    timer.enable_timer(5)
                else:
                    done.set()

            timer = d.create_timer(on_timer)
            timer.enable_timer(5)
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
    assert len(fired) == 2
    # The loop clock has ms granularity: compare whole ms (0.004 can come out as 0.003999...).
    assert round((fired[0] - armed_at) * 1000) >= 4 and round((fired[1] - fired[0]) * 1000) >= 4


def test_run_binds_once_and_exit_is_idempotent() -> None:
    d = Dispatcher("worker_0")
    with running(d):
        post_and_wait(d)
        with pytest.raises(AssertionError, match="already bound"):
            d.run()
        d.exit()
        d.exit()
    assert "worker_0" in repr(d)


def test_real_time_source_reads_clocks() -> None:
    import time

    ts = Dispatcher("x").time_source
    assert abs(ts.system_time() - time.time()) < 5
    assert ts.monotonic() <= time.monotonic()


@pytest.mark.parametrize("from_own_thread", [False, True])
def test_register_watchdog_on_a_running_loop_touches_while_idle(from_own_thread: bool) -> None:
    d = Dispatcher("worker_0")
    touches = [0]
    idle_touches = threading.Event()

    def touch() -> None:
        touches[0] += 1
        if touches[0] >= 3:
            idle_touches.set()

    with running(d):
        post_and_wait(d)  # the loop is running
        if from_own_thread:
            post_and_wait(d, lambda: d.register_watchdog(touch, 5))
        else:
            d.register_watchdog(touch, 5)
        assert idle_touches.wait(WAIT)  # no posts needed: the touch timer fires on its own
