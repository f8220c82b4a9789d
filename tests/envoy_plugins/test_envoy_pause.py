"""Real Envoy 1.40 with the pause plugin: stop in a headers callback, resume from a tick, an
http_call response or a shared-queue item."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [
        Listener("pause", [wasm_filter(plugin("pause"), vm_id="pause")]),
        Listener("no_cluster", [wasm_filter(plugin("pause"), "cluster nope\nqueue other", vm_id="pause2")]),
    ]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def _resumed_headers(r: Response, direction: str) -> dict[str, str]:
    """The headers the plugin added on resume: in the upstream request or in the response."""
    pairs = r.echo()["headers"] if direction == "request" else [list(h) for h in r.headers]
    return {k: v for k, v in pairs if k.startswith(("x-resumed-by", "x-callout", "x-queue-item"))}


@pytest.mark.parametrize("direction", ["request", "response"])
def test_resume_from_tick(envoy: EnvoyRun, direction: str) -> None:
    r = envoy.request("pause", headers={f"x-pause-{direction}": "tick"})
    assert r.status == 200
    assert _resumed_headers(r, direction) == {"x-resumed-by": "tick"}


@pytest.mark.parametrize("direction", ["request", "response"])
def test_resume_from_http_call_response(envoy: EnvoyRun, direction: str) -> None:
    seen = envoy.echo.requests_seen
    r = envoy.request("pause", headers={f"x-pause-{direction}": "http_call"})
    assert r.status == 200
    assert _resumed_headers(r, direction) == {
        "x-callout-status": "200", "x-callout-body": "callout-body", "x-resumed-by": "http_call"}
    assert envoy.echo.requests_seen == seen + 2  # the callout and the request itself


def test_http_call_to_unknown_cluster_fails_at_once(envoy: EnvoyRun) -> None:
    r = envoy.request("no_cluster", headers={"x-pause-request": "http_call"})
    assert r.status == 200
    assert r.echo_header("x-http-call-status") == "2"  # BAD_ARGUMENT
    assert r.echo_header("x-resumed-by") is None


def _wait_for_waiters(envoy: EnvoyRun, count: int, deadline_s: float = 5.0) -> None:
    deadline = time.monotonic() + deadline_s
    while envoy.stat("wasmcustom.pause_waiting") != count:
        assert time.monotonic() < deadline, "the paused request never registered"
        time.sleep(0.01)  # polling Envoy's admin: another process


@pytest.mark.parametrize("direction", ["request", "response"])
def test_resume_from_queue_item_enqueued_by_another_request(envoy: EnvoyRun, direction: str) -> None:
    result: list[Response] = []
    waiter = threading.Thread(target=lambda: result.append(envoy.request("pause", headers={f"x-pause-{direction}": "queue"})))
    waiter.start()
    try:
        _wait_for_waiters(envoy, 1)
        other = envoy.request("pause", headers={"x-pause-enqueue": f"item-{direction}"})
        assert other.status == 200 and other.echo_header("x-resumed-by") is None
    finally:
        waiter.join(timeout=10)
    assert _resumed_headers(result[0], direction) == {"x-queue-item": f"item-{direction}", "x-resumed-by": "queue"}
    assert envoy.stat("wasmcustom.pause_waiting") == 0


def test_item_queued_before_the_waiter_is_taken_without_pausing(envoy: EnvoyRun) -> None:
    envoy.request("pause", headers={"x-pause-enqueue": "early"})
    r = envoy.request("pause", headers={"x-pause-request": "queue"})
    assert _resumed_headers(r, "request") == {"x-queue-item": "early", "x-resumed-by": "queue-immediate"}
