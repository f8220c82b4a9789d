"""SharedData cas semantics and shared-queue delivery, driven by plain calls and threads."""

from __future__ import annotations

import gc
import queue
import threading
from typing import Callable

from wasmproxy.wasm.abi import WasmResult
from wasmproxy.wasm.shared_data import (
    SharedData,
    SharedQueue,
    get_vm_id_handle,
    global_shared_data,
    global_shared_queue,
)


def test_missing_key_is_not_found() -> None:
    sd = SharedData()
    assert sd.get("vm", b"k") == (WasmResult.NotFound, b"", 0)


def test_cas_starts_at_one_and_increments_across_namespaces() -> None:
    sd = SharedData()
    assert sd.set("a", b"k", b"v1", 0) == WasmResult.Ok
    assert sd.get("a", b"k") == (WasmResult.Ok, b"v1", 1)
    assert sd.set("b", b"k", b"v2", 0) == WasmResult.Ok
    assert sd.get("b", b"k") == (WasmResult.Ok, b"v2", 2)


def test_stale_cas_is_rejected_and_zero_cas_writes_unconditionally() -> None:
    sd = SharedData()
    sd.set("vm", b"k", b"v1", 0)
    _, _, cas = sd.get("vm", b"k")
    assert sd.set("vm", b"k", b"v2", cas) == WasmResult.Ok
    assert sd.set("vm", b"k", b"v3", cas) == WasmResult.CasMismatch
    assert sd.get("vm", b"k")[1] == b"v2"
    assert sd.set("vm", b"k", b"v4", 0) == WasmResult.Ok
    assert sd.get("vm", b"k")[1] == b"v4"


def test_cas_on_a_missing_key_creates_it() -> None:
    # cpp-host only compares cas against an existing entry.
    sd = SharedData()
    assert sd.set("vm", b"new", b"v", 12345) == WasmResult.Ok


def test_cas_counter_skips_zero_on_wrap() -> None:
    sd = SharedData()
    sd._cas = 0xFFFFFFFF
    sd.set("vm", b"a", b"", 0)
    sd.set("vm", b"b", b"", 0)
    assert sd.get("vm", b"a")[2] == 0xFFFFFFFF
    assert sd.get("vm", b"b")[2] == 1


def test_sixteen_threads_of_cas_increments_lose_no_update() -> None:
    sd = SharedData()
    sd.set("vm", b"n", b"0", 0)
    threads_n, per_thread = 16, 1000
    start = threading.Barrier(threads_n)
    retries = [0] * threads_n

    def worker(i: int) -> None:
        start.wait()
        done = 0
        for _ in range(per_thread * 100):  # bounded: at most 100 tries per increment on average
            if done == per_thread:
                return
            _, value, cas = sd.get("vm", b"n")
            if sd.set("vm", b"n", str(int(value) + 1).encode(), cas) == WasmResult.Ok:
                done += 1
            else:
                retries[i] += 1
        raise AssertionError("too many cas retries")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sd.get("vm", b"n")[1] == str(threads_n * per_thread).encode()


class FakeThread:
    """A fake worker: post() queues callbacks; drain() runs them on a real thread it owns."""

    def __init__(self) -> None:
        self.posted: "queue.Queue[Callable[[], None] | None]" = queue.Queue()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def post(self, cb: Callable[[], None]) -> None:
        self.posted.put(cb)

    def _run(self) -> None:
        while (cb := self.posted.get()) is not None:
            cb()

    def stop(self) -> None:
        self.posted.put(None)
        self.thread.join()


def test_enqueue_notifies_the_owner_on_its_own_thread_once_per_item() -> None:
    sq = SharedQueue()
    owner = FakeThread()
    seen: list[tuple[int, int]] = []
    token = sq.register_queue("vm", b"q", lambda t: seen.append((t, threading.get_ident())), owner.post)
    assert token != 0
    assert sq.resolve_queue("vm", b"q") == token

    producers_n, items = 4, 250

    def produce(p: int) -> None:
        for i in range(items):
            assert sq.enqueue(token, f"{p}:{i}".encode()) == WasmResult.Ok

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(producers_n)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    owner.stop()

    assert len(seen) == producers_n * items
    assert {t for t, _ in seen} == {token}
    assert {tid for _, tid in seen} == {owner.thread.ident}
    got = []
    while True:
        result, data = sq.dequeue(token)
        if result == WasmResult.Empty:
            break
        got.append(data)
    assert sorted(got) == sorted(f"{p}:{i}".encode() for p in range(producers_n) for i in range(items))


def test_reregistering_replaces_the_owner_and_keeps_items() -> None:
    sq = SharedQueue()
    first: list[int] = []
    second: list[int] = []
    token = sq.register_queue("vm", b"q", first.append, lambda cb: cb())
    sq.enqueue(token, b"a")
    assert sq.register_queue("vm", b"q", second.append, lambda cb: cb()) == token
    sq.enqueue(token, b"b")
    assert first == [token] and second == [token]
    assert sq.dequeue(token) == (WasmResult.Ok, b"a")
    assert sq.dequeue(token) == (WasmResult.Ok, b"b")
    assert sq.dequeue(token) == (WasmResult.Empty, b"")


def test_unknown_queue_token_is_not_found() -> None:
    sq = SharedQueue()
    assert sq.enqueue(42, b"x") == WasmResult.NotFound
    assert sq.dequeue(42) == (WasmResult.NotFound, b"")
    assert sq.resolve_queue("vm", b"nope") == 0


def test_queues_are_namespaced_by_vm_id() -> None:
    sq = SharedQueue()
    a = sq.register_queue("a", b"q", lambda t: None, lambda cb: cb())
    b = sq.register_queue("b", b"q", lambda t: None, lambda cb: cb())
    assert a != b


def test_namespace_is_dropped_with_the_last_vm_id_handle() -> None:
    vm_id = "test_namespace_is_dropped"
    h1 = get_vm_id_handle(vm_id)
    h2 = get_vm_id_handle(vm_id)
    assert h1 is h2
    global_shared_data.set(vm_id, b"k", b"v", 0)
    token = global_shared_queue.register_queue(vm_id, b"q", lambda t: None, lambda cb: cb())
    del h1
    gc.collect()
    assert global_shared_data.get(vm_id, b"k")[0] == WasmResult.Ok  # h2 still holds it
    del h2
    gc.collect()
    assert global_shared_data.get(vm_id, b"k")[0] == WasmResult.NotFound
    assert global_shared_queue.resolve_queue(vm_id, b"q") == 0
    assert global_shared_queue.dequeue(token)[0] == WasmResult.NotFound


def test_queue_items_reach_the_owner_vm_on_its_thread_exactly_once() -> None:
    """Two producer VMs on their own threads enqueue through the ABI; the owner VM's
    proxy_on_queue_ready runs only on the owner's thread, and every item is dequeued once."""
    from tests.wasm_host.guest import Guest

    vm_id = "test_queue_items_reach_the_owner"
    owner_thread = FakeThread()
    ready = threading.Event()
    state: dict = {"dequeued": [], "threads": set()}

    def setup_owner() -> None:
        g = Guest(vm_id=vm_id, post=owner_thread.post)
        q, qn = g.put(b"q", 4096)
        assert g.call(None, "proxy_register_shared_queue", q, qn, 2048) == 0

        def on_ready(root: int, token: int, _: int) -> int:
            state["threads"].add(threading.get_ident())
            for _ in range(10_000):
                if g.hostcall("proxy_dequeue_shared_queue", token, 2048, 2052) != 0:
                    break
                state["dequeued"].append(g.out_bytes(2048, 2052))
            return 0

        g.handlers["proxy_on_queue_ready"] = on_ready
        state["owner"] = g
        ready.set()

    owner_thread.post(setup_owner)
    assert ready.wait(30)

    def produce(p: int) -> None:
        g = Guest(vm_id=vm_id, post=lambda cb: None)
        q, qn = g.put(b"q", 4096)
        assert g.call(None, "proxy_resolve_shared_queue", 0, 0, q, qn, 2048) == 0
        token = g.u32(2048)
        for i in range(200):
            d, dn = g.put(f"{p}:{i}".encode(), 8192)
            assert g.call(None, "proxy_enqueue_shared_queue", token, d, dn) == 0

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(2)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    owner_thread.stop()
    assert state["threads"] == {owner_thread.thread.ident}
    assert sorted(state["dequeued"]) == sorted(f"{p}:{i}".encode() for p in range(2) for i in range(200))


def test_snapshots_for_admin() -> None:
    sd = SharedData()
    sd.set("a", b"k1", b"", 0)
    sd.set("a", b"k2", b"", 0)
    sd.set("b", b"k", b"", 0)
    assert sd.snapshot() == {"a": 2, "b": 1}
    sq = SharedQueue()
    token = sq.register_queue("a", b"q", lambda t: None, lambda cb: None)
    sq.enqueue(token, b"x")
    assert sq.snapshot() == {token: 1}
