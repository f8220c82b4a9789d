"""Timer re-arming as the lazy path does it (bench profile: idle timers re-armed per request)."""

from __future__ import annotations

import threading

from tests.test_dispatcher import WAIT, post_and_wait, running
from wasmproxy.event.dispatcher import Dispatcher


def test_rearm_later_fires_once_at_the_later_deadline() -> None:
    d = Dispatcher("worker_0")
    fired: list[float] = []
    done = threading.Event()
    with running(d):

        def setup() -> float:
            timer = d.create_timer(lambda: (fired.append(d.loop.time()), done.set()))
            timer.enable_timer(10)
            timer.enable_timer(60)  # later: the pending loop timer is kept and re-schedules itself
            assert timer.enabled()
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
        post_and_wait(d)
    d.close()
    assert len(fired) == 1
    assert fired[0] - armed_at >= 0.059  # not at 10 ms (1 ms slack: uvloop's resolution)


def test_rearm_earlier_fires_at_the_earlier_deadline_and_disable_cancels_both() -> None:
    d = Dispatcher("worker_0")
    fired: list[str] = []
    done = threading.Event()
    with running(d):

        def setup() -> float:
            early = d.create_timer(lambda: (fired.append("early"), done.set()))
            early.enable_timer(60_000)
            early.enable_timer(5)  # earlier: replaces the far one
            cancelled = d.create_timer(lambda: fired.append("cancelled"))
            cancelled.enable_timer(1)
            cancelled.enable_timer(30)
            cancelled.disable_timer()  # neither the 1 ms loop timer nor the 30 ms deadline fires
            assert not cancelled.enabled()
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
        assert d.loop.time() - armed_at < 30  # the 60 s deadline was dropped
        finished = threading.Event()
        post_and_wait(d, lambda: d.create_timer(finished.set).enable_timer(40))
        assert finished.wait(WAIT)  # past both of the cancelled timer's deadlines
    d.close()
    assert fired == ["early"]
