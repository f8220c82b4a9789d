"""Differential tests of the router and upstream (retries, timeouts, circuit breakers, cluster
specifiers, health checks, DNS, formatters): tests/diff_cases/router_upstream.yaml run through
real Envoy 1.40 and through wasmproxy must give the same answers (format: tests/support/cases.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cases import REFERENCE, Case, CaseFile, DiffEnvironment, case_params
from support.compare import first_difference
from support.ports import free_port

pytestmark = pytest.mark.envoy

CASES = CaseFile.load(Path(__file__).parent / "diff_cases" / "router_upstream.yaml")


@pytest.fixture(scope="module")
def router_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(CASES, tmp_path_factory.mktemp("router_upstream"), echo_upstream, free_port()) as env:
        yield env


@pytest.mark.parametrize("case", case_params(CASES))
def test_router_upstream(router_env: DiffEnvironment, case: Case) -> None:
    router_env.run(case)


# Cluster stats that depend on timing (bytes per read, health-check rounds, DNS refreshes) are
# left out; everything else must match Envoy's after the same cases.
_TIMING = ("upstream_cx_rx_bytes", "upstream_cx_tx_bytes", "health_check.", "update_", "cluster.dns.default.")


def _cluster_stats(target: Any) -> dict[str, Any]:
    resp = target.process.admin("/stats?format=json")
    assert resp.status == 200, f"{target.name}: /stats?format=json answered {resp.status}"
    return {s["name"]: s["value"] for s in resp.json()["stats"]
            if "name" in s and s["value"] and s["name"].startswith("cluster.")
            and not any(t in s["name"] for t in _TIMING)}


def test_cluster_stats_after_the_cases(router_env: DiffEnvironment) -> None:
    """Runs after the cases (module order): retries, overflow, timeouts, ejections... as counted."""
    seen = {name: _cluster_stats(target) for name, target in router_env.targets.items()}
    if REFERENCE in seen:
        for name, stats in seen.items():
            d = first_difference(seen[REFERENCE], stats)
            assert d is None, (f"stats differ first at {d.field}: {REFERENCE}={d.left} {name}={d.right}\n"
                               f"{REFERENCE}: {seen[REFERENCE]}\n{name}: {stats}")
