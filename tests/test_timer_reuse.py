"""Timer re-arming as idle timers do it per request: a Timer armed again after a disable, or
re-armed while pending, keeps its loop timer and still fires once, at its last deadline."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Callable

from tests.test_dispatcher import WAIT, post_and_wait, running
from wasmproxy.event.dispatcher import Dispatcher, Timer


def _one_fire_delay(arm: Callable[[Timer], None]) -> float:
    """`arm(timer)` on a running dispatcher; the loop-clock seconds from arming to the timer's
    one fire (asserts it fired exactly once)."""
    d = Dispatcher("worker_0")
    fired: list[float] = []
    done = threading.Event()
    with running(d):

        def setup() -> float:
            timer = d.create_timer(lambda: (fired.append(d.loop.time()), done.set()))
            arm(timer)
            return d.loop.time()

        armed_at = post_and_wait(d, setup)
        assert done.wait(WAIT)
        post_and_wait(d)  # a second fire would have run before this
    d.close()
    assert len(fired) == 1
    return fired[0] - armed_at


def test_disable_then_enable_cycles_fire_once_at_the_last_deadline() -> None:
    def arm(timer: Timer) -> None:
        for _ in range(5):  # as a connection's idle timer: armed and disabled per request
            timer.enable_timer(20)
            assert timer.enabled()
            timer.disable_timer()
            assert not timer.enabled()
        timer.enable_timer(50)

    assert _one_fire_delay(arm) >= 0.049


def test_rearm_later_fires_once_at_the_later_deadline() -> None:
    def arm(timer: Timer) -> None:
        timer.enable_timer(10)
        timer.enable_timer(60)  # later: the pending loop timer is kept and re-schedules itself
        assert timer.enabled()

    assert _one_fire_delay(arm) >= 0.059  # not at 10 ms (1 ms slack: uvloop's resolution)


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
    def arm(timer: Timer) -> None:
        timer.enable_timer(60_000)
        timer.disable_timer()
        timer.enable_timer(60_000)
        timer.disable_timer()  # kept: a loop timer 60 s away
        timer.enable_timer(5)

    assert _one_fire_delay(arm) < 30


def test_stream_idle_timeout_on_a_real_loop_fires_per_stream_after_reuse() -> None:
    """The connection's shared stream idle Timer (kept across streams) still times each stream
    from its own last activity."""
    from tests.test_conn_manager import FakeStore, FakeTransport
    from wasmproxy.http.conn_manager import HttpConnectionManagerConfig, WorkerConnectionHandler
    from wasmproxy.http.filter import FilterHeadersStatus, PassThroughFilter
    from wasmproxy.http.headers import HeaderMap

    held: list[PassThroughFilter] = []

    class Hold(PassThroughFilter):
        def decode_headers(self, headers, end_stream):  # type: ignore[no-untyped-def]
            held.append(self)
            return FilterHeadersStatus.StopIteration

    d = Dispatcher("worker_0")
    config = HttpConnectionManagerConfig()
    config.stat_prefix = "ingress"
    config.stream_idle_timeout_ms = 80
    config.filter_factories = [lambda cb: cb.add_stream_filter(Hold())]
    answered: list[tuple[bytes, float]] = []
    done = threading.Event()
    with running(d):

        def setup() -> tuple[object, FakeTransport]:
            handler = WorkerConnectionHandler(config, d, FakeStore())
            conn = handler()
            transport = FakeTransport()
            conn.connection_made(transport)
            return conn, transport

        conn, transport = post_and_wait(d, setup)

        def request_and_answer() -> None:  # a stream that completes: its timer is disabled
            conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # type: ignore[attr-defined]
            held.pop().decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), True)

        for _ in range(3):
            post_and_wait(d, request_and_answer)
        post_and_wait(d)

        def request_unanswered() -> float:
            transport.take()
            conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # type: ignore[attr-defined]

            def watch() -> None:
                if transport.out:
                    answered.append((transport.take(), d.loop.time()))
                    done.set()
                else:
                    d.loop.call_later(0.002, watch)

            watch()
            return d.loop.time()

        started = post_and_wait(d, request_unanswered)
        assert done.wait(WAIT)
    d.close()
    (response, at), = answered
    assert response.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert 0.079 <= at - started < 0.5


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
