"""Differential test of request-level stats: after the same requests, admin /stats must report the
same non-zero counters under Envoy's names in Envoy and in wasmproxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cases import REFERENCE, Case, CaseFile, DiffEnvironment, RequestSpec, Target
from support.compare import first_difference
from support.ports import free_port

pytestmark = pytest.mark.envoy

CASE_FILE = CaseFile.load(Path(__file__).parent / "diff_cases" / "http_data_path.yaml")

# Request-level stats only: connection counts depend on readiness probes and pool timing.
PREFIXES = ("http.ingress_http.downstream_rq_", "http.ingress_http.no_route", "http.ingress_http.rq_",
            "cluster.echo.upstream_rq_", "cluster.down.upstream_cx_connect_fail", "cluster.down.upstream_rq_")

REQUESTS = Case("stats", [
    RequestSpec(path="/exact"),
    RequestSpec(path="/nothing"),
    RequestSpec(path="/down"),
    RequestSpec(path="/slow", headers=[("x-echo-delay-ms", "3000")]),
    RequestSpec(path="/direct"),
    RequestSpec(path="/echo", headers=[("x-echo-status", "503")]),
    RequestSpec(raw=b"GARBAGE\r\n\r\n"),
])

# What Envoy 1.40 reports for REQUESTS (a subset, pinned so the test means something alone).
ENVOY_COUNTERS = {
    "http.ingress_http.downstream_rq_total": 7,
    "http.ingress_http.downstream_rq_2xx": 2,
    "http.ingress_http.downstream_rq_4xx": 2,
    "http.ingress_http.downstream_rq_5xx": 3,
    "http.ingress_http.no_route": 1,
    "http.ingress_http.rq_direct_response": 1,
    "cluster.echo.upstream_rq_total": 3,
    "cluster.echo.upstream_rq_timeout": 1,
    "cluster.echo.upstream_rq_503": 1,
    "cluster.down.upstream_cx_connect_fail": 1,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(CASE_FILE, tmp_path_factory.mktemp("stats"), echo_upstream, free_port()) as env:
        yield env


def _counters(target: Target) -> dict[str, Any]:
    resp = target.process.admin("/stats?format=json")
    assert resp.status == 200, f"{target.name}: /stats?format=json answered {resp.status}"
    return {s["name"]: s["value"] for s in resp.json()["stats"]
            if "name" in s and s["value"] and s["name"].startswith(PREFIXES)}


def test_request_stats_match(env: DiffEnvironment) -> None:
    env.run(REQUESTS)
    seen = {name: _counters(target) for name, target in env.targets.items()}
    if REFERENCE in seen:
        missing = {k: v for k, v in ENVOY_COUNTERS.items() if seen[REFERENCE].get(k) != v}
        assert not missing, f"Envoy's counters changed: expected {missing}, got {seen[REFERENCE]}"
        for name, counters in seen.items():
            d = first_difference(seen[REFERENCE], counters)
            assert d is None, (f"stats differ first at {d.field}: {REFERENCE}={d.left} {name}={d.right}\n"
                               f"{REFERENCE}: {seen[REFERENCE]}\n{name}: {counters}")
    else:
        for name, counters in seen.items():
            assert {k: counters.get(k) for k in ENVOY_COUNTERS} == ENVOY_COUNTERS, name
