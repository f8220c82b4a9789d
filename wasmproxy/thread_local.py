"""ThreadLocal: how the main thread publishes state to every worker (Envoy's TLS).

Mirrors ``source/common/thread_local/thread_local_impl.cc``:

* Workers are registered (on main, before they run); each gets its dispatcher
  recorded in its own thread-local data by a post.
* A :class:`Slot` is an index into every thread's data list. ``set(init_cb)``
  posts ``init_cb(dispatcher)`` to every worker and runs it on main right away;
  each thread stores its own result. ``get()`` reads the calling thread's entry:
  no lock, since only that thread writes it, and a replacement is a single
  reference store, so a reader sees the old object or the new one, never a mix.
* Updates land between two events of a worker's loop (the "quiescent period"
  of the seed): never in the middle of a request.
* Posted closures hold only a weak reference to the slot and check its freed
  flag, so a slot freed on main while updates are in flight does nothing on the
  workers (Envoy's ``still_alive_guard_``). Callbacks passed in must not
  capture the slot or its owner.
* A worker whose dispatcher already exited is skipped (and counts as done for
  ``run_on_all_threads``): during shutdown its thread-local data is gone anyway.
  Envoy avoids the case by calling ``shutdown_global_threading`` before stopping
  workers; do the same.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from wasmproxy.event.dispatcher import DispatcherExitedError
from wasmproxy.log import get_logger

__all__ = ["Slot", "ThreadLocalInstance"]


_log = get_logger("main")


class _Dispatcher(Protocol):
    name: str

    def post(self, cb: Callable[[], None]) -> None: ...


class _ThreadData(threading.local):
    """Per-thread state of one ThreadLocalInstance (Envoy's ``thread_local_data_``)."""

    def __init__(self) -> None:
        self.dispatcher: _Dispatcher | None = None
        self.data: list[Any] = []


class ThreadLocalInstance:
    """The process's TLS registry. Created on the main thread, which it then treats as main."""

    def __init__(self, main_dispatcher: _Dispatcher) -> None:
        self._main_thread_id = threading.get_ident()
        self._main_dispatcher = main_dispatcher
        self._registered: list[_Dispatcher] = []
        self._next_index = 0
        self._free_indexes: list[int] = []
        self._shutdown = False
        self._tls = _ThreadData()
        self._tls.dispatcher = main_dispatcher

    # -- asserts -------------------------------------------------------------

    def _assert_main_thread(self) -> None:
        # ASSERT_IS_MAIN_OR_TEST_THREAD(): cheap enough to keep in production.
        if threading.get_ident() != self._main_thread_id:
            raise AssertionError(f"main thread only (called on {threading.current_thread().name!r})")

    def _assert_not_shutdown(self) -> None:
        if self._shutdown:
            raise AssertionError("thread local is shut down (shutdown_global_threading was called)")

    # -- registration ----------------------------------------------------------

    def register_thread(self, dispatcher: _Dispatcher) -> None:
        """Main thread only: add a worker; its thread learns its dispatcher via a post.

        Register every worker before setting slots: values set earlier are not replayed.
        """
        self._assert_main_thread()
        self._assert_not_shutdown()
        self._registered.append(dispatcher)
        tls = self._tls

        def bind() -> None:
            tls.dispatcher = dispatcher

        dispatcher.post(bind)

    def current_thread_registered(self) -> bool:
        """Any thread: whether the calling thread is main or a registered worker that has started."""
        return self._tls.dispatcher is not None

    @property
    def dispatcher(self) -> _Dispatcher | None:
        """The calling thread's dispatcher (None on an unregistered thread)."""
        return self._tls.dispatcher

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown

    # -- slots -----------------------------------------------------------------

    def allocate_slot(self) -> Slot:
        """Main thread only: a new slot, reusing a freed index when there is one."""
        self._assert_main_thread()
        self._assert_not_shutdown()
        if self._free_indexes:
            index = self._free_indexes.pop()
        else:
            index = self._next_index
            self._next_index += 1
        return Slot(self, index)

    def _remove_slot(self, index: int) -> None:
        self._assert_main_thread()
        if self._shutdown:
            # Threads are gone or going; shutdown_thread() clears their data.
            return
        self._free_indexes.append(index)
        tls = self._tls

        def clear() -> None:
            if index < len(tls.data):
                tls.data[index] = None

        # The clear runs after every update posted earlier for this index (posts
        # are FIFO per dispatcher), so a reused index starts empty everywhere.
        self._run_on_all_threads(clear, None)

    def _set_thread_local(self, index: int, obj: Any) -> None:
        data = self._tls.data
        if index >= len(data):
            data.extend([None] * (index + 1 - len(data)))
        data[index] = obj

    def _get_thread_local(self, index: int) -> Any:
        data = self._tls.data
        return data[index] if index < len(data) else None

    def _post(self, dispatcher: _Dispatcher, cb: Callable[[], None]) -> bool:
        """Post to a worker; a worker whose loop already exited is skipped (its data is gone)."""
        try:
            dispatcher.post(cb)
        except DispatcherExitedError:
            _log.debug("thread local: %s has exited; update skipped", dispatcher.name)
            return False
        return True

    def _run_on_all_threads(self, cb: Callable[[], None], complete_cb: Callable[[], None] | None) -> None:
        """Main first, then every worker; ``complete_cb`` posted to main after the last worker."""
        cb()
        # One count per worker plus one for this posting loop, so a fast worker cannot
        # finish the count before every post is out.
        remaining = [len(self._registered) + 1]
        lock = threading.Lock()
        main = self._main_dispatcher

        def done_one() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and complete_cb is not None:
                main.post(complete_cb)

        def on_thread() -> None:
            cb()
            done_one()

        for dispatcher in self._registered:
            if not self._post(dispatcher, on_thread):
                done_one()
        done_one()

    # -- shutdown (Envoy's order) ---------------------------------------------------

    def shutdown_global_threading(self) -> None:
        """Main thread only, first step of shutdown: no more set/run_on_all_threads."""
        self._assert_main_thread()
        if self._shutdown:
            raise AssertionError("shutdown_global_threading called twice")
        self._shutdown = True

    def shutdown_thread(self) -> None:
        """On each thread (workers as they end, main last): drop this thread's objects.

        Reverse slot order, as Envoy: later slots (filters, ...) are built on
        earlier ones (cluster manager, stats) and go first.
        """
        if not self._shutdown:
            raise AssertionError("shutdown_thread before shutdown_global_threading")
        data = self._tls.data
        for i in range(len(data) - 1, -1, -1):
            data[i] = None
        data.clear()


class Slot:
    """One TLS slot: a per-thread object published from main (Envoy's ``SlotImpl``).

    Call ``free()`` when done: Envoy frees in the slot's destructor, but Python
    collects garbage on whichever thread drops the last reference, at no fixed time.
    A slot collected without ``free()`` only stops its in-flight updates.
    """

    __slots__ = ("__weakref__", "_freed", "_index", "_parent")

    def __init__(self, parent: ThreadLocalInstance, index: int) -> None:
        self._parent = parent
        self._index = index
        self._freed = False

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Wrap ``fn`` to do nothing once this slot is freed; holds the slot weakly."""
        ref = weakref.ref(self)

        def guarded() -> None:
            slot = ref()
            if slot is not None and not slot._freed:
                fn()

        return guarded

    def set(self, init_cb: Callable[[Any], Any]) -> None:
        """Main thread only: store ``init_cb(dispatcher)`` on main now and on every worker via post."""
        parent = self._parent
        parent._assert_main_thread()
        parent._assert_not_shutdown()
        self._assert_live()
        index = self._index
        for dispatcher in parent._registered:

            def init(dispatcher: _Dispatcher = dispatcher) -> None:
                parent._set_thread_local(index, init_cb(dispatcher))

            parent._post(dispatcher, self._guarded(init))
        parent._set_thread_local(index, init_cb(parent._main_dispatcher))

    def get(self) -> Any:
        """Any thread: this thread's object, or None if not set here (yet) or the thread is not
        registered (its data list is empty)."""
        # _get_thread_local, inlined: filters read their slot once per stream.
        data = self._parent._tls.data
        index = self._index
        return data[index] if index < len(data) else None

    def current_thread_registered(self) -> bool:
        return self._parent.current_thread_registered()

    def run_on_all_threads(
        self, cb: Callable[[Any], None], complete_cb: Callable[[], None] | None = None
    ) -> None:
        """Main thread only: ``cb(obj)`` on main and each worker with that thread's object;
        then ``complete_cb()`` on main, once, after all have run.

        If the slot is freed before a worker runs ``cb``, that worker skips it and
        ``complete_cb`` is dropped (its owner is going away). Envoy still posts
        ``complete_cb``; we prefer not to call back into a torn-down owner.
        """
        parent = self._parent
        parent._assert_main_thread()
        parent._assert_not_shutdown()
        self._assert_live()
        index = self._index

        def update() -> None:
            cb(parent._get_thread_local(index))

        guarded_complete = self._guarded(complete_cb) if complete_cb is not None else None
        parent._run_on_all_threads(self._guarded(update), guarded_complete)

    def free(self) -> None:
        """Main thread only: release the index; updates still in flight become no-ops."""
        self._parent._assert_main_thread()
        if self._freed:
            return
        self._freed = True
        self._parent._remove_slot(self._index)

    def _assert_live(self) -> None:
        if self._freed:
            raise AssertionError("slot used after free()")
