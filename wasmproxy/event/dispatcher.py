"""Dispatcher: one uvloop event loop per thread, with Envoy's cross-thread ``post``.

Mirrors ``source/common/event/dispatcher_impl.cc``:

* ``post(cb)`` (any thread) appends to a list under a small lock and, only when
  the list was empty, arms one wake-up of the loop. One lock covers the append
  and the wake-up, as trio's ``run_sync_soon`` does, so a wake-up is never lost.
* ``_run_post_callbacks`` (the dispatcher's thread) first clears the
  deferred-delete list, then swaps the whole list out under the lock, releases
  it and runs the callbacks in order, touching the watchdog before each. A
  callback posted while draining lands in the new list and arms a new wake-up,
  so it runs in a later loop iteration: a callback that keeps posting cannot
  starve the loop.

Where we differ from Envoy, on purpose:

* A callback that raises is logged (component "main", with the dispatcher name)
  and the drain goes on. Envoy has no exceptions on this path and would crash.
* ``post`` after ``exit()`` raises :class:`DispatcherExitedError` (trio's
  ``RunFinishedError``) instead of queueing work that would never run. Work
  posted before ``exit()`` still runs: ``run()`` does a final drain before it
  returns. (Work posted to a dispatcher whose ``run()`` is never called is
  never run: post before run only queues.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import uvloop

from wasmproxy.log import get_logger

__all__ = [
    "Dispatcher",
    "DispatcherExitedError",
    "DispatcherStatistics",
    "RealTimeSource",
    "SimulatedTimeSource",
    "TimeSource",
    "Timer",
]

_log = get_logger("main")
_get_ident = threading.get_ident


class DispatcherExitedError(RuntimeError):
    """``post`` was called after the dispatcher's ``exit()``: the callback would never run."""


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    """A snapshot for admin and tests (trio's ``statistics()``): it does not change after return."""

    name: str
    thread_id: int | None
    pending_posts: int
    pending_deferred_deletes: int
    exited: bool


class TimeSource(Protocol):
    """Where a dispatcher (and the watchdog) reads time; tests pass a simulated one."""

    def monotonic(self) -> float: ...

    def system_time(self) -> float: ...


class RealTimeSource:
    """``time.monotonic`` / ``time.time``, in seconds."""

    # The clock functions themselves (not wrappers): the connection manager and the router read
    # "now" a dozen times per request.
    monotonic = staticmethod(time.monotonic)
    system_time = staticmethod(time.time)


class SimulatedTimeSource:
    """A clock that moves only when a test calls ``advance`` (Envoy's SimulatedTimeSystem)."""

    def __init__(self, monotonic: float = 1000.0, system_time: float = 1_800_000_000.0) -> None:
        self._monotonic = monotonic
        self._system_time = system_time

    def monotonic(self) -> float:
        return self._monotonic

    def system_time(self) -> float:
        return self._system_time

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._system_time += seconds


class _LoopFire:
    """The callback of a Timer's loop handle. It holds the Timer only while the Timer is enabled:
    a disabled Timer whose handle stays pending (see Timer) keeps neither itself nor its owner
    alive through the loop."""

    __slots__ = ("handle", "pending", "timer", "when")

    handle: asyncio.TimerHandle | asyncio.Handle | None  # None once run (no cycle with it)
    pending: bool  # the handle has not run (nor been cancelled)
    timer: Timer | None  # the Timer to run when the handle runs; None: disabled meanwhile
    when: float | None  # the loop time it is scheduled for; None: the next iteration

    def __call__(self) -> None:
        self.pending = False
        self.handle = None
        timer = self.timer
        if timer is not None:
            timer._fire()


class Timer:
    """A one-shot timer on its dispatcher's loop (Envoy's ``Event::Timer``).

    Dispatcher thread only. ``enable_timer`` re-arms (cancelling a pending fire);
    the callback runs at most once per enable.

    Cancelling and re-creating a uvloop timer costs ~1 us, a measurable share of a request, and
    idle timers are re-armed on every request, so the loop's timer is kept when it can be:

    * re-arming to a deadline not before the pending loop timer only moves ``_deadline``: an
      early fire re-schedules itself for the rest;
    * a timer that is armed again after a disable (one reused per connection, unlike one made
      per request) keeps its loop timer on disable, detached from the Timer, so that the next
      enable can take it over; when it runs detached it does nothing.
    """

    __slots__ = ("_cb", "_deadline", "_dispatcher", "_fire_at", "_reused")

    # An early fire closer than this to the deadline runs the callback (uvloop timers have 1 ms
    # resolution; re-scheduling for less would spin).
    _SLACK_S = 0.001

    def __init__(self, dispatcher: Dispatcher, cb: Callable[[], None]) -> None:
        self._dispatcher = dispatcher
        self._cb = cb
        # The loop handle last scheduled for this timer (pending or not, attached or not), if any.
        self._fire_at: _LoopFire | None = None
        self._deadline: float | None = None  # loop time the callback is due; None: next iteration
        self._reused = False  # armed again after a disable: keep the loop timer on disable

    def enable_timer(self, ms: float) -> None:
        """Fire ``cb`` after ``ms`` milliseconds (0: in the next loop iteration)."""
        dispatcher = self._dispatcher
        if dispatcher.thread_id != _get_ident():
            dispatcher.assert_thread_safe()
        loop = dispatcher.loop
        if ms <= 0:
            self._deadline = None
            self._schedule(loop, None)
            return
        deadline = loop.time() + ms / 1000.0
        fire = self._fire_at
        if fire is not None:
            if fire.pending:
                when = fire.when
                if when is not None and deadline >= when:
                    # The pending loop timer comes first and re-schedules itself for the rest.
                    if fire.timer is None:
                        fire.timer = self
                        self._reused = True
                    self._deadline = deadline
                    return
                _cancel(fire)
            else:
                self._reused = True  # armed before, and again now
        self._deadline = deadline
        # _schedule(loop, deadline), inline: a timer made per request (the router's) comes here.
        fire = self._fire_at = _LoopFire()
        fire.timer = self
        fire.pending = True
        fire.when = deadline
        fire.handle = loop.call_at(deadline, fire)

    def disable_timer(self) -> None:
        """Cancel a pending fire; harmless when not enabled."""
        dispatcher = self._dispatcher
        if dispatcher.thread_id != _get_ident():
            dispatcher.assert_thread_safe()
        fire = self._fire_at
        if fire is None or fire.timer is None:
            return
        self._deadline = None
        fire.timer = None
        if fire.pending and not (self._reused and fire.when is not None):
            # _cancel(fire), inline (a timer made per request comes here).
            fire.pending = False
            fire.handle.cancel()  # type: ignore[union-attr]  # pending: it has one
            fire.handle = None
        # Else the loop timer is kept for the next enable_timer; it runs detached if there is none.

    def enabled(self) -> bool:
        fire = self._fire_at
        return fire is not None and fire.timer is not None

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        """Replace the loop handle with one for ``when`` (None: the next iteration)."""
        old = self._fire_at
        if old is not None and old.pending:
            _cancel(old)
        fire = self._fire_at = _LoopFire()
        fire.timer = self
        fire.pending = True
        fire.when = when
        fire.handle = loop.call_soon(fire) if when is None else loop.call_at(when, fire)

    def _fire(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            loop = self._dispatcher.loop
            if deadline - loop.time() > self._SLACK_S:  # re-armed later since it was scheduled
                self._schedule(loop, deadline)
                return
        fire = self._fire_at
        if fire is not None:
            fire.timer = None
        self._deadline = None
        self._dispatcher._run_guarded(self._cb)


def _cancel(fire: _LoopFire) -> None:
    """Detach ``fire`` from its Timer and cancel its loop handle if it has not run."""
    fire.timer = None
    if fire.pending:
        fire.pending = False
        assert fire.handle is not None
        fire.handle.cancel()
        fire.handle = None


class Dispatcher:
    """An event loop bound to one thread; see the module docstring for the post rules.

    ``time_source`` is where code reads "now" (the watchdog, stream timings);
    timers run on the loop's own clock.
    """

    def __init__(
        self,
        name: str,
        watchdog_touch: Callable[[], None] | None = None,
        time_source: TimeSource | None = None,
    ) -> None:
        self.name = name
        self.time_source: TimeSource = time_source if time_source is not None else RealTimeSource()
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.thread_id: int | None = None
        self._watchdog_touch = watchdog_touch
        self._touch_interval_ms = 100.0
        self._touch_timer: Timer | None = None
        self._post_lock = threading.Lock()
        self._post_callbacks: list[Callable[[], None]] = []
        self._exited = False
        self._deferred_delete: list[Any] = []
        self._deferred_delete_scheduled = False

    # -- thread binding ---------------------------------------------------

    def is_thread_safe(self) -> bool:
        """True when called on the dispatcher's own thread (the one running ``run``)."""
        return self.thread_id == threading.get_ident()

    def assert_thread_safe(self) -> None:
        """Raise AssertionError unless called on the dispatcher's own thread."""
        if self.thread_id != threading.get_ident():
            raise AssertionError(
                f"dispatcher '{self.name}' used from thread {threading.current_thread().name!r}; "
                f"it runs on thread id {self.thread_id}"
            )

    def register_watchdog(self, touch: Callable[[], None], min_touch_interval_ms: float = 100.0) -> None:
        """Any thread: call ``touch`` before each post callback and every ``min_touch_interval_ms``
        (Envoy's ``registerWatchdog``; the timer keeps an idle loop from looking stuck).
        The default suits the default 200 ms miss timeout; pass the guard dog's interval."""
        self._watchdog_touch = touch
        self._touch_interval_ms = min_touch_interval_ms
        if self.is_thread_safe():
            self._arm_touch_timer()
        elif self.thread_id is not None:
            self.post(self._arm_touch_timer)
        # Not running yet: run() arms it.

    set_watchdog_touch = register_watchdog

    def _arm_touch_timer(self) -> None:
        if self._touch_timer is None:
            self._touch_timer = Timer(self, self._on_touch_timer)
        self._touch_timer.enable_timer(self._touch_interval_ms)

    def _on_touch_timer(self) -> None:
        if self._watchdog_touch is not None:
            self._watchdog_touch()
        self._arm_touch_timer()

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Run the loop on the calling thread until ``exit()``; binds the dispatcher to it."""
        if self.thread_id is not None:
            raise AssertionError(f"dispatcher '{self.name}' is already bound to thread {self.thread_id}")
        self.thread_id = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        if self._watchdog_touch is not None:
            self._arm_touch_timer()
        try:
            self.loop.run_forever()
        finally:
            # Work accepted before exit() runs now; post() refuses anything newer.
            self._run_post_callbacks()
            self._clear_deferred_delete_list()

    def exit(self) -> None:
        """Any thread: stop the loop after the current iteration; later posts raise."""
        with self._post_lock:
            if self._exited:
                return
            self._exited = True
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.stop)

    def close(self) -> None:
        """Release the loop's resources; after ``run`` returned, or if it never ran."""
        self.loop.close()

    # -- post ---------------------------------------------------------------

    def post(self, cb: Callable[[], None]) -> None:
        """Any thread: run ``cb`` on this dispatcher's thread, in post order, in a later drain.

        Raises DispatcherExitedError after ``exit()``.
        """
        with self._post_lock:
            if self._exited:
                raise DispatcherExitedError(f"dispatcher '{self.name}' has exited")
            self._post_callbacks.append(cb)
            if len(self._post_callbacks) == 1:
                if self.thread_id == _get_ident():
                    self.loop.call_soon(self._run_post_callbacks)
                else:
                    self.loop.call_soon_threadsafe(self._run_post_callbacks)

    def _run_post_callbacks(self) -> None:
        # Clear deferred deletes first (as Envoy) so a post callback touching a
        # deleted object shows up deterministically. (An empty list has nothing scheduled.)
        if self._deferred_delete:
            self._clear_deferred_delete_list()
        with self._post_lock:
            callbacks = self._post_callbacks
            self._post_callbacks = []
        touch = self._watchdog_touch
        for cb in callbacks:
            if touch is not None:
                touch()
            try:  # _run_guarded(cb), inline: a post or two per request come here
                cb()
            except Exception:
                _log.exception("dispatcher '%s': callback %r raised; continuing", self.name, cb)

    def _run_guarded(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except Exception:
            _log.exception("dispatcher '%s': callback %r raised; continuing", self.name, cb)

    # -- timers and deferred delete ----------------------------------------------

    def create_timer(self, cb: Callable[[], None]) -> Timer:
        """Dispatcher thread (or before run): a disabled Timer that will call ``cb``."""
        return Timer(self, cb)

    def deferred_delete(self, obj: Any) -> None:
        """Dispatcher thread: drop ``obj`` (calling ``obj.on_deferred_delete()`` if present) soon.

        Happens at the start of the next post drain or the next loop iteration,
        whichever comes first, never inside the current callback stack.
        """
        self.assert_thread_safe()
        self._deferred_delete.append(obj)
        if not self._deferred_delete_scheduled:
            self._deferred_delete_scheduled = True
            self.loop.call_soon(self._clear_deferred_delete_list)

    def _clear_deferred_delete_list(self) -> None:
        self._deferred_delete_scheduled = False
        # Bounded: objects deferred by an on_deferred_delete go to the fresh list
        # and are handled by the iteration scheduled for them.
        to_delete, self._deferred_delete = self._deferred_delete, []
        for obj in to_delete:
            hook = getattr(obj, "on_deferred_delete", None)
            if hook is not None:
                self._run_guarded(hook)
        to_delete.clear()

    def statistics(self) -> DispatcherStatistics:
        """Any thread: queue depths right now (the deferred-delete count is exact on the owner thread)."""
        with self._post_lock:
            pending, exited = len(self._post_callbacks), self._exited
        return DispatcherStatistics(self.name, self.thread_id, pending, len(self._deferred_delete), exited)

    def __repr__(self) -> str:
        return f"<Dispatcher {self.name} thread={self.thread_id}>"
