"""Real Envoy 1.40 with the shared plugin: SharedData with CAS, namespaced by vm_id, and shared
queues (register, resolve across VMs, enqueue, on_queue_ready, dequeue)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from envoy_harness import EnvoyRun, Listener, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [
        Listener("vm1", [wasm_filter(plugin("shared"), vm_id="vm1")]),
        Listener("vm2", [wasm_filter(plugin("shared"), vm_id="vm2")]),
        Listener("to_vm1", [wasm_filter(plugin("shared"), "vm_id vm1", vm_id="vm3")]),
        Listener("counter", [wasm_filter(plugin("shared"), vm_id="counter")]),
    ]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def test_counter_increments_once_per_request_even_when_concurrent(envoy: EnvoyRun) -> None:
    first = int(envoy.request("counter").header("x-shared-counter") or 0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = sorted(int(r.header("x-shared-counter") or 0)
                        for r in pool.map(lambda _: envoy.request("counter"), range(20)))
    assert values == list(range(first + 1, first + 21))


def test_get_set_and_compare_and_swap(envoy: EnvoyRun) -> None:
    missing = envoy.request("vm1", headers={"x-shared-get": "missing"})
    assert missing.header("x-shared-get-result") == "1:0:"  # NOT_FOUND, cas 0
    assert envoy.request("vm1", headers={"x-shared-set": "k=v1"}).header("x-shared-set-status") == "0"
    status, cas, value = (envoy.request("vm1", headers={"x-shared-get": "k"}).header("x-shared-get-result") or "").split(":")
    assert (status, value) == ("0", "v1") and int(cas) > 0
    stale = envoy.request("vm1", headers={"x-shared-set": "k=v2", "x-shared-set-cas": str(int(cas) + 1000)})
    assert stale.header("x-shared-set-status") == "8"  # CAS_MISMATCH
    fresh = envoy.request("vm1", headers={"x-shared-set": "k=v3", "x-shared-set-cas": cas})
    assert fresh.header("x-shared-set-status") == "0"
    status, new_cas, value = (envoy.request("vm1", headers={"x-shared-get": "k"}).header("x-shared-get-result") or "").split(":")
    assert value == "v3" and int(new_cas) > int(cas)


def test_shared_data_is_namespaced_by_vm_id(envoy: EnvoyRun) -> None:
    envoy.request("vm1", headers={"x-shared-set": "ns=one"})
    assert envoy.request("vm2", headers={"x-shared-get": "ns"}).header("x-shared-get-result") == "1:0:"


def test_queue_items_reach_on_queue_ready_of_the_registering_vm(envoy: EnvoyRun) -> None:
    assert envoy.request("vm1", headers={"x-shared-enqueue": "a"}).header("x-shared-enqueue-status") == "0:0"
    assert envoy.request("vm1", headers={"x-shared-enqueue": "b"}).header("x-shared-enqueue-status") == "0:0"
    assert envoy.request("to_vm1", headers={"x-shared-enqueue": "c"}).header("x-shared-enqueue-status") == "0:0"
    log = envoy.request("vm1", headers={"x-shared-get": "shared.queue.log"}).header("x-shared-get-result") or ""
    assert log.split(":")[0] == "0" and log.split(":")[2] == "a,b,c"
    # on_queue_ready drained the queue.
    assert envoy.request("vm1", headers={"x-shared-dequeue": "1"}).header("x-shared-dequeue-result") == "7:"  # EMPTY


def test_resolve_shared_queue(envoy: EnvoyRun) -> None:
    def resolve(spec: str) -> str | None:
        return envoy.request("vm2", headers={"x-shared-resolve": spec}).header("x-shared-resolve-status")

    assert resolve("vm1/shared_queue") == "0"
    assert resolve("vm1/nope") == "1"  # NOT_FOUND
    assert resolve("vm9/shared_queue") == "1"


def test_counter_is_shared_by_every_worker(proxy: str) -> None:
    """Two workers, each with its own VM clone: one SharedData, no lost or repeated increments."""
    with EnvoyRun([Listener("counter", [wasm_filter(plugin("shared"), vm_id="workers")])], concurrency=2, proxy=proxy) as run:
        # The first increment alone: a key that does not exist yet can only be written with cas 0
        # (unconditionally), so two workers creating it at once would both write 1, on Envoy too.
        responses = [run.request("counter")]
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses += pool.map(lambda _: run.request("counter"), range(39))
    assert sorted(int(r.header("x-shared-counter") or 0) for r in responses) == list(range(1, 41))
