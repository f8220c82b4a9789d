"""GuardDog / WatchDog: notice a thread whose event loop stopped turning (Envoy's guarddog_impl).

Each watched thread owns a :class:`WatchDog`; its dispatcher calls ``touch()``
before every post callback and from a periodic touch timer (half the guard
dog's loop interval, as Envoy): ``create_watchdog(name, dispatcher=d)`` sets
both up through ``Dispatcher.register_watchdog``. ``touch`` only sets a flag: no clock read, no
lock, cheap on the hot path. The :class:`GuardDog` ``step()`` turns flags into
last-check-in times and counts threads that have been silent too long:

* past ``miss_timeout``: ``<name>.watchdog_miss`` and ``server.<thread>.watchdog_miss``
  (once per silent stretch);
* past ``megamiss_timeout``: the ``watchdog_mega_miss`` pair likewise;
* past ``kill_timeout`` (0 = off): the kill action, ``os.abort()`` by default,
  as Envoy aborts the process; ``multikill_timeout`` with
  ``multikill_threshold`` percent of threads likewise.

Envoy 1.40 keeps two guard dogs, "main_thread" and "workers", so the counters it
shows are ``main_thread.watchdog_miss``, ``workers.watchdog_miss``,
``server.main_thread.watchdog_miss`` and ``server.worker_0.watchdog_miss``
(there is no ``server.watchdog_miss``; checked against a running Envoy).

The guard dog runs on its own small thread, as Envoy's does ("dog:<name>"):
the main thread is itself watched, so it cannot be the one watching; a thread
that blocks in Python code still releases the GIL every switch interval, so the
guard thread gets to run.
"""

from __future__ import annotations

import enum
import math
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmproxy.event.dispatcher import RealTimeSource, TimeSource
from wasmproxy.log import get_logger

if TYPE_CHECKING:
    from wasmproxy.event.dispatcher import Dispatcher
    from wasmproxy.stats import Counter, Store

__all__ = ["GuardDog", "WatchDog", "WatchDogAction", "WatchDogEvent", "abort_process"]

_log = get_logger("main")


class WatchDogEvent(enum.Enum):
    """Envoy's ``WatchdogAction.WatchdogEvent``: what a guard dog action is called for."""

    KILL = 1
    MULTIKILL = 2
    MEGAMISS = 3
    MISS = 4


# An action gets the event, the (thread name, last check-in) pairs it concerns and "now"
# (Envoy's GuardDogAction::run).
WatchDogAction = Callable[[WatchDogEvent, list[tuple[str, float]], float], None]


def abort_process(dog: WatchDog, silent_for_s: float) -> None:
    """Envoy's kill action: log at critical and abort (core dump, no cleanup)."""
    _log.critical(
        "watchdog: thread %s (%s) has not responded for %.0f ms; aborting",
        dog.thread_name, dog.thread_id, silent_for_s * 1000,
    )
    os.abort()


class WatchDog:
    """One watched thread's heartbeat; ``touch`` from that thread only (a flag store)."""

    __slots__ = ("thread_id", "thread_name", "touched")

    def __init__(self, thread_name: str, thread_id: int | None = None) -> None:
        self.thread_name = thread_name
        self.thread_id = thread_id
        self.touched = True

    def touch(self) -> None:
        self.touched = True


class _WatchedDog:
    __slots__ = ("dog", "last_checkin", "megamiss_alerted", "megamiss_counter", "miss_alerted", "miss_counter")

    def __init__(self, dog: WatchDog, now: float, miss: Counter, megamiss: Counter) -> None:
        self.dog = dog
        self.last_checkin = now
        self.miss_alerted = False
        self.megamiss_alerted = False
        self.miss_counter = miss
        self.megamiss_counter = megamiss


class GuardDog:
    """Watches WatchDogs from its own thread; config mirrors Bootstrap ``watchdogs.*``.

    Thread rules: ``create_watchdog``/``stop_watching`` from any thread (they take
    the guard dog's lock, as Envoy's ``wd_lock_``); ``step`` from the guard
    thread, or from a test after advancing a simulated time source.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        miss_timeout_ms: float = 200,
        megamiss_timeout_ms: float = 1000,
        kill_timeout_ms: float = 0,
        multikill_timeout_ms: float = 0,
        multikill_threshold: float = 0,
        actions: list[tuple[WatchDogEvent, WatchDogAction]] | None = None,
        time_source: TimeSource | None = None,
        kill_action: Callable[[WatchDog, float], None] = abort_process,
    ) -> None:
        """``store``: where the counters live (main's Store is fine: only the guard thread
        increments them). Timeouts in ms, 0 = off, defaults as Envoy's Bootstrap ``watchdogs``.
        ``actions`` observe events (Envoy's ``watchdog.actions``); ``kill_action`` ends the
        process on KILL/MULTIKILL (a test passes a recorder)."""
        self.name = name
        self._store = store
        self._time = time_source if time_source is not None else RealTimeSource()
        self._miss_s = miss_timeout_ms / 1000
        self._megamiss_s = megamiss_timeout_ms / 1000
        self._kill_s = kill_timeout_ms / 1000
        self._multikill_s = multikill_timeout_ms / 1000
        self._multikill_threshold = multikill_threshold
        self._actions = list(actions or ())
        self._kill_action = kill_action
        intervals = [t for t in (self._miss_s, self._megamiss_s, self._kill_s, self._multikill_s) if t > 0]
        # Envoy: the loop runs at the smallest configured interval; workers touch at half of it.
        self.loop_interval_s = min(intervals) if intervals else 1.0
        self.touch_interval_ms = self.loop_interval_s * 1000 / 2
        self._miss = store.counter(f"{name}.watchdog_miss")
        self._megamiss = store.counter(f"{name}.watchdog_mega_miss")
        self._lock = threading.Lock()
        self._dogs: list[_WatchedDog] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- registration ---------------------------------------------------------

    def create_watchdog(
        self, thread_name: str, thread_id: int | None = None, dispatcher: Dispatcher | None = None
    ) -> WatchDog:
        """Any thread: watch a new thread; its per-thread counters are ``server.<thread_name>.*``.

        With ``dispatcher``, that dispatcher touches the dog before each post callback and
        every ``touch_interval_ms`` (``Dispatcher.register_watchdog``, as Envoy's).
        """
        if thread_id is None and dispatcher is not None:
            thread_id = dispatcher.thread_id
        dog = WatchDog(thread_name, thread_id)
        if dispatcher is not None:
            dispatcher.register_watchdog(dog.touch, self.touch_interval_ms)
        # Per-thread counters live in the guard dog's store (main's), like Envoy's server scope.
        with self._lock:
            self._dogs.append(
                _WatchedDog(
                    dog,
                    self._time.monotonic(),
                    self._store.counter(f"server.{thread_name}.watchdog_miss"),
                    self._store.counter(f"server.{thread_name}.watchdog_mega_miss"),
                )
            )
        return dog

    def stop_watching(self, dog: WatchDog) -> None:
        """Any thread: stop watching ``dog`` (its thread is exiting)."""
        with self._lock:
            self._dogs = [w for w in self._dogs if w.dog is not dog]

    # -- the check ---------------------------------------------------------------

    def step(self) -> None:
        """One pass over the watched threads (Envoy's ``GuardDogImpl::step``)."""
        now = self._time.monotonic()
        misses: list[tuple[str, float]] = []
        megamisses: list[tuple[str, float]] = []
        multikill: list[tuple[WatchDog, float]] = []
        with self._lock:
            dogs = list(self._dogs)
        for w in dogs:
            if w.dog.touched:
                w.dog.touched = False
                w.last_checkin = now
                w.miss_alerted = False
                w.megamiss_alerted = False
                continue
            silent = now - w.last_checkin
            if self._miss_s > 0 and silent > self._miss_s and not w.miss_alerted:
                w.miss_alerted = True
                self._miss.inc()
                w.miss_counter.inc()
                misses.append((w.dog.thread_name, w.last_checkin))
            if self._megamiss_s > 0 and silent > self._megamiss_s and not w.megamiss_alerted:
                w.megamiss_alerted = True
                self._megamiss.inc()
                w.megamiss_counter.inc()
                megamisses.append((w.dog.thread_name, w.last_checkin))
            if self._kill_s > 0 and silent > self._kill_s:
                self._invoke(WatchDogEvent.KILL, [(w.dog.thread_name, w.last_checkin)], now)
                self._kill_action(w.dog, silent)
            if self._multikill_s > 0 and silent > self._multikill_s:
                multikill.append((w.dog, w.last_checkin))
        if multikill:
            # Envoy: at least 2 threads, and at least threshold percent of the watched ones.
            required = max(2, math.ceil(self._multikill_threshold / 100 * len(dogs)))
            if len(multikill) >= required:
                self._invoke(WatchDogEvent.MULTIKILL, [(d.thread_name, t) for d, t in multikill], now)
                self._kill_action(multikill[0][0], now - multikill[0][1])
        # Envoy's order: mega-miss actions, then miss actions.
        if megamisses:
            _log.warning("watchdog %s: mega miss on %s", self.name, [n for n, _ in megamisses])
            self._invoke(WatchDogEvent.MEGAMISS, megamisses, now)
        if misses:
            _log.debug("watchdog %s: miss on %s", self.name, [n for n, _ in misses])
            self._invoke(WatchDogEvent.MISS, misses, now)

    def _invoke(self, event: WatchDogEvent, threads: list[tuple[str, float]], now: float) -> None:
        for ev, action in self._actions:
            if ev is event:
                try:
                    action(event, threads, now)
                except Exception:
                    _log.exception("watchdog %s: %s action raised", self.name, event.name)

    # -- the guard thread -------------------------------------------------------

    def start(self) -> None:
        """Start the guard thread (daemon: it must never keep the process alive)."""
        if self._thread is not None:
            raise AssertionError(f"guard dog '{self.name}' already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"dog:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the guard thread; safe if never started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        # Event.wait doubles as the interval tick and the stop signal.
        while not self._stop.wait(self.loop_interval_s):
            self.step()
