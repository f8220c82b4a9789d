"""SharedData (key/value with compare-and-swap) and shared queues: process-wide, any thread.

cpp-host src/shared_data.cc and src/shared_queue.cc. Both are namespaced by vm_id and are
the one structure on the request path that takes a lock, as in Envoy. A namespace (its keys
and its queues) is dropped when the last Wasm of that vm_id goes away: every Wasm holds the
`VmIdHandle` of its vm_id, and the handle's finalizer drops the namespace (cpp-host
vm_id_handle.h).

Queue notification: `enqueue` appends under the lock, releases it, then hands the owner's
`on_ready(token)` to the owner's own `post` callable, so `proxy_on_queue_ready` always runs on
the thread that registered the queue, never on the enqueuer's.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .abi import WasmResult

__all__ = [
    "SharedData",
    "SharedQueue",
    "VmIdHandle",
    "get_vm_id_handle",
    "global_shared_data",
    "global_shared_queue",
]

Post = Callable[[Callable[[], None]], None]


class SharedData:
    """Process-wide key/value store per vm_id; each value carries a cas from one global counter."""

    def __init__(self) -> None:
        # Re-entrant: a VmIdHandle finalizer may run (GC) on a thread already inside a method.
        self._lock = threading.RLock()
        self._cas = 1
        self._data: dict[str, dict[bytes, tuple[bytes, int]]] = {}

    def _next_cas(self) -> int:
        cas = self._cas
        self._cas = (self._cas + 1) & 0xFFFFFFFF or 1  # 0 is never a valid cas
        return cas

    def get(self, vm_id: str, key: bytes) -> tuple[WasmResult, bytes, int]:
        """(Ok, value, cas) or (NotFound, b"", 0)."""
        with self._lock:
            entry = self._data.get(vm_id, {}).get(key)
        if entry is None:
            return WasmResult.NotFound, b"", 0
        return WasmResult.Ok, entry[0], entry[1]

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> WasmResult:
        """Store `value`; cas 0 writes unconditionally, otherwise it must equal the stored cas."""
        with self._lock:
            namespace = self._data.setdefault(vm_id, {})
            entry = namespace.get(key)
            if entry is not None and cas and cas != entry[1]:
                return WasmResult.CasMismatch
            namespace[key] = (bytes(value), self._next_cas())
        return WasmResult.Ok

    def delete_vm_id(self, vm_id: str) -> None:
        with self._lock:
            self._data.pop(vm_id, None)

    def snapshot(self) -> dict[str, int]:
        """vm_id -> number of keys, for admin output."""
        with self._lock:
            return {vm_id: len(ns) for vm_id, ns in self._data.items()}


@dataclass
class _Queue:
    vm_id: str
    on_ready: Callable[[int], None]
    post: Post
    items: deque[bytes] = field(default_factory=deque)


class SharedQueue:
    """Named queues per vm_id; tokens are process-wide, never 0, never reused while live."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._next_token = 1
        self._tokens: dict[tuple[str, bytes], int] = {}
        self._queues: dict[int, _Queue] = {}

    def _alloc_token(self) -> int:
        while True:
            token = self._next_token
            self._next_token = (self._next_token + 1) & 0xFFFFFFFF
            if token != 0 and token not in self._queues:
                return token

    def register_queue(self, vm_id: str, name: bytes, on_ready: Callable[[int], None], post: Post) -> int:
        """Create the queue or take it over: the caller becomes the owner; queued items stay."""
        with self._lock:
            token = self._tokens.get((vm_id, name))
            if token is None:
                token = self._alloc_token()
                self._tokens[(vm_id, name)] = token
                self._queues[token] = _Queue(vm_id, on_ready, post)
            else:
                queue = self._queues[token]
                queue.on_ready = on_ready
                queue.post = post
            return token

    def resolve_queue(self, vm_id: str, name: bytes) -> int:
        """The token of a registered queue, or 0."""
        with self._lock:
            return self._tokens.get((vm_id, name), 0)

    def dequeue(self, token: int) -> tuple[WasmResult, bytes]:
        with self._lock:
            queue = self._queues.get(token)
            if queue is None:
                return WasmResult.NotFound, b""
            if not queue.items:
                return WasmResult.Empty, b""
            return WasmResult.Ok, queue.items.popleft()

    def enqueue(self, token: int, value: bytes) -> WasmResult:
        """Append and notify the owner on its own thread (through its post)."""
        with self._lock:
            queue = self._queues.get(token)
            if queue is None:
                return WasmResult.NotFound
            queue.items.append(bytes(value))
            on_ready, post = queue.on_ready, queue.post
        post(lambda: on_ready(token))
        return WasmResult.Ok

    def delete_vm_id(self, vm_id: str) -> None:
        with self._lock:
            for key in [k for k in self._tokens if k[0] == vm_id]:
                del self._queues[self._tokens.pop(key)]

    def snapshot(self) -> dict[int, int]:
        """token -> queued items, for admin output."""
        with self._lock:
            return {token: len(q.items) for token, q in self._queues.items()}


global_shared_data = SharedData()
global_shared_queue = SharedQueue()


class VmIdHandle:
    """Held by every Wasm of one vm_id; when the last one is dropped the namespace goes too."""

    __slots__ = ("vm_id", "__weakref__")

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id


_handles_lock = threading.RLock()  # re-entrant: a finalizer may run under it (GC)
_handles: "weakref.WeakValueDictionary[str, VmIdHandle]" = weakref.WeakValueDictionary()


def _drop_vm_id(vm_id: str) -> None:
    with _handles_lock:
        if vm_id in _handles:  # a new Wasm of this vm_id appeared meanwhile: keep its data
            return
    global_shared_data.delete_vm_id(vm_id)
    global_shared_queue.delete_vm_id(vm_id)


def get_vm_id_handle(vm_id: str) -> VmIdHandle:
    """The live handle for `vm_id`, creating it (and arming its cleanup) if there is none."""
    with _handles_lock:
        handle = _handles.get(vm_id)
        if handle is None:
            handle = VmIdHandle(vm_id)
            _handles[vm_id] = handle
            weakref.finalize(handle, _drop_vm_id, vm_id)
        return handle
