"""Shared pytest setup: markers, the echo upstream, proxy logs on failure."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest

from support.processes import ENVOY_BIN, live_processes
from wasmproxy.demo.upstream import start_in_thread


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--diff-reference-only", action="store_true",
                     help="differential tests: run the cases against real Envoy only "
                          "(same as WASMPROXY_DIFF_REFERENCE_ONLY=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "envoy: needs the real Envoy binary (.venv/bin/envoy)")
    if config.getoption("--diff-reference-only"):
        os.environ["WASMPROXY_DIFF_REFERENCE_ONLY"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENVOY_BIN.exists():
        return
    skip = pytest.mark.skip(reason=f"real Envoy not found at {ENVOY_BIN}")
    for item in items:
        if "envoy" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When a test fails, attach the log tail of every proxy process still running."""
    report = yield
    if report.failed:
        for proc in live_processes():
            report.sections.append((f"{proc.name} log (pid {proc.pid})", proc.log_tail()))
    return report


@pytest.fixture(scope="session")
def echo_upstream() -> Iterator[int]:
    """Port of an echo upstream (wasmproxy.demo.upstream) running for the whole session."""
    server, port = start_in_thread("127.0.0.1", 0)
    yield port
    server.stop()
