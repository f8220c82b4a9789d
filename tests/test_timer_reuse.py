"""A Timer armed again after a disable (an idle timer reused per connection) keeps its loop timer."""

from __future__ import annotations

import gc
import threading
import weakref

from tests.test_dispatcher import WAIT, post_and_wait, running
from wasmproxy.event.dispatcher import Dispatcher


def test_disable_then_enable_cycles_fire_once_at_the_last_deadline() -> None:
    d = Dispatcher("worker_0")
    fired: list[float] = []
    done = threading.Event()
    with running(d):

        def setup() -> float:
            timer = d.create_timer(lambda: (fired.append(d.loop.time()), done.set()))
            for _ in range(5):  # as a connection's idle timer: armed and disabled per request
                timer.enable_timer(20)
                assert timer.enabled()
                timer.disable_timer()
                assert not timer.enabled()
            timer.enable_timer(50)
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
        post_and_wait(d)
    d.close()
    assert len(fired) == 1
    assert fired[0] - armed_at >= 0.049


def test_a_reused_timer_left_disabled_never_fires_nor_is_kept_alive() -> None:
    d = Dispatcher("worker_0")
    fired: list[str] = []
    finished = threading.Event()
    refs: list[weakref.ref] = []
    with running(d):

        def setup() -> None:
            owner = type("Owner", (), {})()
            timer = d.create_timer(lambda: fired.append("reused"))
            owner.timer = timer  # type: ignore[attr-defined]
            timer.enable_timer(10)
            timer.disable_timer()
            timer.enable_timer(10)
            timer.disable_timer()  # its loop timer stays pending, detached
            refs.append(weakref.ref(owner))
            d.create_timer(finished.set).enable_timer(40)

        post_and_wait(d, setup)
        gc.collect()
        assert refs[0]() is None  # the pending loop timer does not hold the owner
        assert finished.wait(WAIT)
    d.close()
    assert fired == []


def test_enable_earlier_than_a_kept_loop_timer_fires_at_the_earlier_deadline() -> None:
    d = Dispatcher("worker_0")
    fired: list[float] = []
    done = threading.Event()
    with running(d):

        def setup() -> float:
            timer = d.create_timer(lambda: (fired.append(d.loop.time()), done.set()))
            timer.enable_timer(60_000)
            timer.disable_timer()
            timer.enable_timer(60_000)
            timer.disable_timer()  # kept: a loop timer 60 s away
            timer.enable_timer(5)
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
        post_and_wait(d)
        assert d.loop.time() - armed_at < 30
    d.close()
    assert len(fired) == 1
