"""Real Envoy 1.40 with the metrics plugin: counters, gauges, histograms and their statuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [
        Listener("metrics", [wasm_filter(plugin("metrics"), vm_id="m")]),
        Listener("other", [wasm_filter(plugin("metrics"), vm_id="m2", vm_configuration="other_")]),
    ]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def test_counter_gauge_and_histogram(envoy: EnvoyRun) -> None:
    r = envoy.request("metrics")
    start = int((r.header("x-metrics-counter") or "").split(":")[1])
    assert r.header("x-metrics-counter") == f"0:{start}"
    assert r.header("x-metrics-histogram") == "2:0"  # get_metric on a histogram: BAD_ARGUMENT
    assert envoy.request("metrics", headers={"x-metrics-gauge-add": "5"}).header("x-metrics-gauge") == "0:5"
    assert envoy.request("metrics", headers={"x-metrics-gauge-add": "-2"}).header("x-metrics-gauge") == "0:3"
    r = envoy.request("metrics", headers={"x-metrics-gauge-set": "42", "x-metrics-record": "7"})
    assert (r.header("x-metrics-gauge"), r.header("x-metrics-counter")) == ("0:42", f"0:{start + 3}")


def test_error_statuses(envoy: EnvoyRun) -> None:
    before = int((envoy.request("metrics").header("x-metrics-counter") or "").split(":")[1])
    r = envoy.request("metrics", headers={"x-metrics-errors": "1"})
    assert r.header("x-metrics-bad-type") == "2"  # BAD_ARGUMENT
    assert r.header("x-metrics-bad-id") == "1"  # NOT_FOUND
    assert r.header("x-metrics-get-bad-id") == "1"
    assert r.header("x-metrics-redefine") == "0:0"  # OK, but a new id for the same name
    assert r.header("x-metrics-counter-record") == "0"  # record_metric on a counter adds
    assert r.header("x-metrics-histogram-add") == "2"
    assert r.header("x-metrics-counter") == f"0:{before + 1 + 5}"


def test_metrics_appear_in_admin_stats(envoy: EnvoyRun) -> None:
    envoy.request("other")
    assert envoy.stat("wasmcustom.other_requests") == 1
    gauge = int((envoy.request("metrics").header("x-metrics-gauge") or "").split(":")[1])
    assert envoy.stat("wasmcustom.metrics_gauge") == gauge
    prometheus = envoy.admin("/stats/prometheus")
    assert "# TYPE other_requests counter\nother_requests{} 1\n" in prometheus  # no wasmcustom prefix
    assert "# TYPE metrics_histogram histogram" in prometheus
