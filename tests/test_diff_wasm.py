"""Differential tests of Proxy-Wasm plugins as HTTP filters: the same config, plugins and requests
through real Envoy 1.40 and through wasmproxy must give the same answers (tests/support/cases.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cases import Case, CaseFile, DiffEnvironment, case_params
from support.ports import free_port

pytestmark = pytest.mark.envoy

CASES_DIR = Path(__file__).parent / "diff_cases"
PLUGINS = CaseFile.load(CASES_DIR / "wasm_plugins.yaml")
FAIL_CLOSED = CaseFile.load(CASES_DIR / "wasm_fail_closed.yaml")
FAIL_OPEN = CaseFile.load(CASES_DIR / "wasm_fail_open.yaml")
CALLOUTS = CaseFile.load(CASES_DIR / "wasm_callouts.yaml")
NEEDED = ("headers", "body", "local_reply", "as_header", "trap", "pause", "props")


def _environment(case_file: CaseFile, tmp_path_factory: pytest.TempPathFactory,
                 echo_port: int) -> Iterator[DiffEnvironment]:
    from plugins.build import build

    build(list(NEEDED))  # the configs point at plugins/out
    with DiffEnvironment(case_file, tmp_path_factory.mktemp(case_file.path.stem), echo_port, free_port()) as env:
        yield env


@pytest.fixture(scope="module")
def plugins_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(PLUGINS, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def fail_closed_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(FAIL_CLOSED, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def fail_open_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(FAIL_OPEN, tmp_path_factory, echo_upstream)


@pytest.mark.parametrize("case", case_params(PLUGINS))
def test_wasm_plugins(plugins_env: DiffEnvironment, case: Case) -> None:
    plugins_env.run(case)


@pytest.mark.parametrize("case", case_params(FAIL_CLOSED))
def test_wasm_fail_closed(fail_closed_env: DiffEnvironment, case: Case) -> None:
    fail_closed_env.run(case)


@pytest.mark.parametrize("case", case_params(FAIL_OPEN))
def test_wasm_fail_open(fail_open_env: DiffEnvironment, case: Case) -> None:
    fail_open_env.run(case)


@pytest.fixture(scope="module")
def callouts_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(CALLOUTS, tmp_path_factory, echo_upstream)


@pytest.mark.parametrize("case", case_params(CALLOUTS))
def test_wasm_callouts(callouts_env: DiffEnvironment, case: Case) -> None:
    callouts_env.run(case)
