"""Differential tests of the router and upstream (retries, timeouts, circuit breakers, cluster
specifiers, health checks, DNS, formatters): tests/diff_cases/router_upstream.yaml run through
real Envoy 1.40 and through wasmproxy must give the same answers (format: tests/support/cases.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cases import Case, CaseFile, DiffEnvironment, case_params
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
