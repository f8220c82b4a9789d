"""WasmService (envoy.bootstrap.wasm), socket-free: where its plugin runs, and the SharedData /
http_call / shared-queue pattern with an HTTP reader on the same vm_id (plugin tcp_service)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from envoy.extensions.wasm.v3 import wasm_pb2

from wasm_filter_support import FakeClusterManager, FakeDispatcher, factory_context, plugin_config
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.service import create_wasm_service
from wasmproxy.wasm.shared_data import global_shared_data, global_shared_queue

_vm_ids = itertools.count(1)


def _service(context: Any, singleton: bool, vm_id: str, configuration: str) -> Any:
    proto = wasm_pb2.WasmService(singleton=singleton, config=plugin_config(
        "tcp_service", configuration, name="service", root_id="service", vm_id=vm_id))
    return create_wasm_service(proto, context)


def _run_posted_on_own_thread(dispatcher: FakeDispatcher) -> None:
    """A worker's posts run on a thread of its own (plugin handles are per OS thread)."""
    thread = threading.Thread(target=dispatcher.run_posted)
    thread.start()
    thread.join(10)


def _configured(context: Any) -> int:
    return context.main_store.counter("wasmcustom.service.configured").value


def test_singleton_runs_once_on_the_main_dispatcher_and_its_timer_writes_shared_data() -> None:
    main, worker = FakeDispatcher("main_thread"), FakeDispatcher("worker_0")
    context = factory_context(main, FakeClusterManager(("token",)))
    context.thread_local.register_thread(worker)
    vm_id = f"svc{next(_vm_ids)}"
    service = _service(context, True, vm_id, "period 10\ntoken tok\ncluster token")
    _run_posted_on_own_thread(worker)
    assert _configured(context) == 2  # the canary VM and the one instance (Envoy 1.40 counts both too)
    assert worker.armed_timers() == []
    ticks = [t for t in main.armed_timers() if t.armed_ms == 10]
    assert len(ticks) == 1
    ticks[0].fire()
    assert global_shared_data.get(vm_id, b"service.token")[1] == b"tok-"
    # The first tick made an http_call from the main thread; its answer feeds the next tick.
    (cluster, headers, _, _, callbacks), = context.cluster_manager.tlcm.async_client.requests
    assert cluster == "token" and headers.get(":path") == "/token"
    callbacks.on_success(HeaderMap([(":status", "200")]), b"abc", None)
    next(t for t in main.armed_timers() if t.armed_ms == 10).fire()
    assert global_shared_data.get(vm_id, b"service.token")[1] == b"tok-abc"
    assert service.wasm() is not None


def test_not_singleton_runs_one_instance_per_thread() -> None:
    main, worker = FakeDispatcher("main_thread"), FakeDispatcher("worker_0")
    context = factory_context(main)
    context.thread_local.register_thread(worker)
    service = _service(context, False, f"svc{next(_vm_ids)}", "period 50")  # kept: its VMs live as long
    _run_posted_on_own_thread(worker)
    assert _configured(context) == 3  # canary, main and the worker (Envoy's TLS slot sets on main too)
    # The worker's instance made its tick timer on the worker's dispatcher (our stand-in thread
    # has ended, taking its thread-local instance and so the timer's arming with it).
    assert len(worker.timers) == 1 and [t.armed_ms for t in main.timers] == [50]
    assert service.wasm() is not None


def test_items_enqueued_by_the_reader_wake_the_service_on_its_thread() -> None:
    main = FakeDispatcher("main_thread")
    context = factory_context(main)
    vm_id = f"svc{next(_vm_ids)}"
    service = _service(context, True, vm_id, "period 1000")
    queue_id = global_shared_queue.resolve_queue(vm_id, b"service.queue")
    assert queue_id
    global_shared_queue.enqueue(queue_id, b"item1")
    main.run_posted()  # proxy_on_queue_ready runs through the service's dispatcher
    assert global_shared_data.get(vm_id, b"service.last_item")[1] == b"item1"
    assert service.singleton
