"""vm_key, the base-VM cache, the canary, per-thread clones and the wasm.* lifecycle stats."""

from __future__ import annotations

import gc
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from tests.wasm_filter_support import (
    FakeDispatcher,
    Stream,
    factory_context,
    http_wasm,
    plugin_config,
    plugin_path,
)
from wasmproxy.stats.store import Store
from wasmproxy.wasm.code import compile_code
from wasmproxy.wasm.context import Plugin
from wasmproxy.wasm.http_filter import create_wasm_filter_factory
from wasmproxy.wasm.plugin import PluginConfig, get_or_create_thread_local_plugin
from wasmproxy.wasm.stats import LifecycleStats
from wasmproxy.wasm.vm import WasmThread, create_wasm, get_or_create_thread_local_wasm, make_vm_key

T = TypeVar("T")


def test_vm_key_is_upper_hex_sha256_of_id_configuration_and_code() -> None:
    expected = hashlib.sha256(b"my_vm||cfg||\x00asm").hexdigest().upper()
    assert make_vm_key("my_vm", b"cfg", b"\x00asm") == expected
    assert make_vm_key("my_vm", b"cfg2", b"\x00asm") != expected


def _thread(store: Store | None = None) -> WasmThread:
    dispatcher = FakeDispatcher()
    return WasmThread(post=dispatcher.post, timer_factory=dispatcher.create_timer, stats_store=store or Store(),
                      time_source=dispatcher.time_source)


def _base(vm_id: str, vm_configuration: bytes = b"", plugin_configuration: bytes = b"",
          lifecycle: LifecycleStats | None = None) -> tuple[Any, Plugin]:
    code = Path(plugin_path("headers")).read_bytes()
    module = compile_code(code, "headers", False)
    assert module is not None
    plugin = Plugin(name="headers", vm_id=vm_id, vm_configuration=vm_configuration,
                    plugin_configuration=plugin_configuration)
    handle = create_wasm(make_vm_key(vm_id, vm_configuration, code), module, plugin, thread=_thread(),
                         lifecycle=lifecycle or LifecycleStats(Store()))
    assert handle is not None
    return handle, plugin


def test_same_vm_key_shares_the_base_vm_and_a_different_configuration_does_not() -> None:
    a, _ = _base("shared-vm")
    b, _ = _base("shared-vm", plugin_configuration=b"other plugin config")
    c, _ = _base("shared-vm", vm_configuration=b"other vm config")
    assert a is b
    assert c is not a and c.wasm.vm_key != a.wasm.vm_key


def test_base_vm_cache_holds_only_weak_references() -> None:
    lifecycle = LifecycleStats(Store())
    first, _ = _base("weak-vm", lifecycle=lifecycle)
    again, _ = _base("weak-vm", lifecycle=lifecycle)
    assert again is first and (lifecycle.created.value, lifecycle.active.value) == (3, 1)  # + one canary
    del first, again
    gc.collect()
    _base("weak-vm", lifecycle=lifecycle)
    # the cache did not keep the first base alive: a new base (and its canary) was created
    assert (lifecycle.created.value, lifecycle.active.value) == (5, 0)


def test_canary_runs_once_per_plugin_and_is_destroyed() -> None:
    lifecycle = LifecycleStats(Store())
    base, _ = _base("canary-vm", lifecycle=lifecycle)
    assert (lifecycle.created.value, lifecycle.active.value) == (2, 1)  # base + canary, canary gone
    assert base.wasm.root_contexts == {}  # the base VM itself never starts a plugin


def _on_thread(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    return executor.submit(fn).result(timeout=30)


def test_each_thread_gets_its_own_clone_with_its_own_store() -> None:
    base, plugin = _base("per-thread-vm")
    workers = [ThreadPoolExecutor(max_workers=1) for _ in range(2)]
    try:
        threads = [_thread(), _thread()]
        handles = [_on_thread(w, lambda t=t: get_or_create_thread_local_plugin(base, plugin, t))
                   for w, t in zip(workers, threads)]
        again = _on_thread(workers[0], lambda: get_or_create_thread_local_plugin(base, plugin, threads[0]))
        assert all(h is not None for h in handles)
        assert again is handles[0]  # the thread-local cache
        wasm0, wasm1 = handles[0].wasm, handles[1].wasm  # type: ignore[union-attr]
        assert wasm0 is not wasm1 and wasm0 is not base.wasm
        assert wasm0.vm._store is not wasm1.vm._store  # type: ignore[union-attr]
        assert wasm0.vm._store is not base.wasm.vm._store  # type: ignore[union-attr]
    finally:
        for w in workers:
            w.shutdown()


def test_a_failed_clone_is_replaced_on_that_thread_only() -> None:
    base, plugin = _base("replace-vm")
    workers = [ThreadPoolExecutor(max_workers=1) for _ in range(2)]
    try:
        threads = [_thread(), _thread()]
        first = [_on_thread(w, lambda t=t: get_or_create_thread_local_wasm(base, t)) for w, t in zip(workers, threads)]
        from wasmproxy.wasm.abi import FailState

        first[0].wasm.fail(FailState.RuntimeError, "test trap")  # type: ignore[union-attr]
        second = [_on_thread(w, lambda t=t: get_or_create_thread_local_wasm(base, t)) for w, t in zip(workers, threads)]
        assert second[0] is not first[0] and not second[0].wasm.is_failed()  # type: ignore[union-attr]
        assert second[1] is first[1]
    finally:
        for w in workers:
            w.shutdown()


# -- PluginConfig across a main thread and workers -------------------------------------------


class Workers:
    """Worker threads with FakeDispatchers registered with the ThreadLocal instance."""

    def __init__(self, context: Any, n: int) -> None:
        self.dispatchers = [FakeDispatcher(f"worker_{i}") for i in range(n)]
        self.executors = [ThreadPoolExecutor(max_workers=1) for _ in range(n)]
        for d in self.dispatchers:
            context.thread_local.register_thread(d)

    def run_posted(self) -> None:
        for d, e in zip(self.dispatchers, self.executors):
            _on_thread(e, d.run_posted)

    def on(self, i: int, fn: Callable[[], T]) -> T:
        return _on_thread(self.executors[i], fn)

    def close(self) -> None:
        for e in self.executors:
            e.shutdown()


@pytest.fixture
def two_workers() -> Iterator[tuple[Any, Workers]]:
    context = factory_context()
    workers = Workers(context, 2)
    yield context, workers
    workers.close()


def test_lifecycle_stats_count_like_envoy(two_workers: tuple[Any, Workers]) -> None:
    """Envoy 1.40 with one worker: base + canary + main clone + worker clone = 4 created, 3 active;
    a second plugin on the same VM adds only its canary."""
    context, workers = two_workers
    first = PluginConfig(plugin_config("headers", "a", vm_id="stats-vm", name="p1"), context)
    workers.run_posted()
    store = context.main_store
    created, active = "wasm.envoy.wasm.runtime.v8.created", "wasm.envoy.wasm.runtime.v8.active"
    assert (store.counter(created).value, store.gauge(active).value) == (5, 4)  # two workers here
    second = PluginConfig(plugin_config("headers", "b", vm_id="stats-vm", name="p2"), context)
    workers.run_posted()
    assert (store.counter(created).value, store.gauge(active).value) == (6, 4)
    assert store.gauge("wasm.wasm_vm_count").value == 4
    assert first.wasm() is second.wasm()  # one clone per thread serves both plugins


def test_plugins_differing_only_in_name_get_their_own_root_contexts() -> None:
    context = factory_context()
    one = PluginConfig(plugin_config("headers", "same", vm_id="names-vm", name="one"), context)
    two = PluginConfig(plugin_config("headers", "same", vm_id="names-vm", name="two"), context)
    wasm = one.wasm()
    assert wasm is not None and wasm is two.wasm()
    assert one.plugin.key != two.plugin.key
    assert len(wasm.root_contexts) == 2


def test_trap_on_one_worker_reloads_only_that_workers_clone(two_workers: tuple[Any, Workers]) -> None:
    context, workers = two_workers
    factory = create_wasm_filter_factory(
        http_wasm(plugin_config("trap", vm_id="two-workers", failure_policy="FAIL_RELOAD", reload_base_ms=1)), context)
    workers.run_posted()

    def stream(phase: str | None = None) -> Stream:
        s = Stream([factory])
        s.request([("x-trap-phase", phase)] if phase else [])
        if not s.downstream.ended:
            s.respond(200)
        s.finish()
        return s

    def requests(s: Stream) -> str | None:
        return s.downstream.headers.get("x-trap-requests") if s.downstream.headers is not None else None

    assert workers.on(0, stream).downstream.status == 200
    assert requests(workers.on(1, stream)) == "1"
    assert workers.on(0, lambda: stream("request_headers")).downstream.status == 503
    for d in workers.dispatchers:
        d.time_source.advance(1.0)
    assert requests(workers.on(0, stream)) == "1"  # a fresh clone on worker 0
    assert requests(workers.on(1, stream)) == "2"  # worker 1 kept its VM
    assert context.main_store.counter("wasm.trap.vm_reload_success").value == 1


def test_singleton_plugin_runs_once_on_the_main_thread(two_workers: tuple[Any, Workers]) -> None:
    context, workers = two_workers
    config = PluginConfig(plugin_config("headers", vm_id="singleton-vm", name="svc"), context, singleton=True)
    workers.run_posted()
    store = context.main_store
    # base + canary + one main-thread clone: no worker clones
    assert store.counter("wasm.envoy.wasm.runtime.v8.created").value == 3
    wasm = config.wasm()
    assert wasm is not None and not wasm.is_failed()
