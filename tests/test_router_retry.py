"""RetryPolicy parsing and RetryState decisions (Envoy's retry_state_impl rules)."""

from __future__ import annotations

import random

import pytest
from envoy.config.route.v3 import route_components_pb2
from google.protobuf.json_format import ParseDict

from wasmproxy.http.headers import HeaderMap
from wasmproxy.router.retry import RetryPolicy, RetryState
from wasmproxy.upstream.conn_pool import StreamResetReason as R


def policy(d: dict) -> RetryPolicy:
    return RetryPolicy.from_proto(ParseDict(d, route_components_pb2.RetryPolicy()))


def test_policy_defaults_and_fields() -> None:
    p = policy({"retry_on": "5xx,bogus, connect-failure"})
    assert p.retry_on == {"5xx", "connect-failure"}
    assert (p.num_retries, p.per_try_timeout_ms, p.base_interval_ms, p.max_interval_ms) == (1, 0, 25, 250)
    p = policy({"retry_on": "retriable-status-codes", "num_retries": 0, "per_try_timeout": "0.5s",
                "retriable_status_codes": [418], "retry_back_off": {"base_interval": "0.1s"}})
    assert (p.num_retries, p.per_try_timeout_ms, p.retriable_status_codes) == (0, 500, {418})
    assert (p.base_interval_ms, p.max_interval_ms) == (100, 1000)


def test_state_needs_a_condition_and_a_retry() -> None:
    assert RetryState.create(None, HeaderMap()) is None
    assert RetryState.create(policy({"retry_on": "5xx", "num_retries": 0}), HeaderMap()) is None


def test_headers_extend_the_policy_and_are_removed() -> None:
    h = HeaderMap([("x-envoy-retry-on", "retriable-4xx"), ("x-envoy-max-retries", "4")])
    state = RetryState.create(policy({"retry_on": "reset"}), h)
    assert state is not None and state.retry_on == {"reset", "retriable-4xx"} and state.retries_remaining == 4
    assert "x-envoy-retry-on" not in h and "x-envoy-max-retries" not in h
    only_header = RetryState.create(None, HeaderMap([("x-envoy-retry-on", "5xx")]))
    assert only_header is not None and only_header.retries_remaining == 1


@pytest.mark.parametrize(
    "retry_on, reason, expected",
    [
        ("connect-failure", R.RemoteConnectionFailure, True),
        ("connect-failure", R.ConnectionTimeout, True),
        ("connect-failure", R.ConnectionTermination, False),
        ("reset", R.ConnectionTermination, True),
        ("5xx", R.RemoteConnectionFailure, True),  # 5xx covers "no response at all"
        ("gateway-error", R.ConnectionTermination, True),
        ("retriable-4xx", R.ConnectionTermination, False),
        ("reset", R.Overflow, False),  # overflow is never retried
    ],
)
def test_would_retry_reset(retry_on: str, reason: R, expected: bool) -> None:
    state = RetryState.create(policy({"retry_on": retry_on}), HeaderMap())
    assert state is not None and state.would_retry_reset(reason) is expected


@pytest.mark.parametrize(
    "retry_on, status, extra, expected",
    [
        ("5xx", 500, {}, True),
        ("5xx", 503, {"x-envoy-overloaded": "true"}, False),
        ("5xx", 404, {}, False),
        ("gateway-error", 502, {}, True),
        ("gateway-error", 500, {}, False),
        ("retriable-4xx", 409, {}, True),
        ("retriable-4xx", 400, {}, False),
        ("envoy-ratelimited", 429, {"x-envoy-ratelimited": "true"}, True),
        ("envoy-ratelimited", 429, {}, False),
    ],
)
def test_would_retry_headers(retry_on: str, status: int, extra: dict, expected: bool) -> None:
    state = RetryState.create(policy({"retry_on": retry_on}), HeaderMap())
    assert state is not None
    assert state.would_retry_headers(status, HeaderMap([(":status", str(status)), *extra.items()])) is expected


def test_retriable_status_codes_and_per_try_timeout() -> None:
    state = RetryState.create(policy({"retry_on": "retriable-status-codes", "retriable_status_codes": [418]}), HeaderMap())
    assert state.would_retry_headers(418, HeaderMap()) and not state.would_retry_headers(500, HeaderMap())
    assert not state.would_retry_per_try_timeout()
    assert RetryState.create(policy({"retry_on": "reset"}), HeaderMap()).would_retry_per_try_timeout()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    state = RetryState.create(policy({"retry_on": "5xx", "retry_back_off": {"base_interval": "0.01s",
                                                                           "max_interval": "0.05s"}}), HeaderMap())
    state.rng = random.Random(7)
    ceilings = [10, 30, 50, 50, 50]
    for ceiling in ceilings:
        assert 0 <= state.next_backoff_ms() < ceiling
