"""Retries: the route's RetryPolicy and one request's RetryState (Envoy's router/retry_state_impl.cc).

Supported retry_on conditions: 5xx, gateway-error, reset, connect-failure, retriable-4xx,
retriable-status-codes, envoy-ratelimited (refused-stream never happens on HTTP/1). Like
Envoy, 5xx and gateway-error also cover resets and connect failures, responses carrying
x-envoy-overloaded are never retried, and the x-envoy-retry-on / x-envoy-max-retries
request headers (trusted by the time they reach the router) add to the policy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..http.headers import HeaderMap
from ..upstream.conn_pool import StreamResetReason

DEFAULT_BASE_INTERVAL_MS = 25
_CONNECT_FAILURES = frozenset(
    (StreamResetReason.LocalConnectionFailure, StreamResetReason.RemoteConnectionFailure,
     StreamResetReason.ConnectionTimeout)
)
_KNOWN = frozenset(("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
                    "retriable-status-codes", "envoy-ratelimited", "reset-before-request"))


def _ms(duration: Any) -> int:
    return duration.seconds * 1000 + duration.nanos // 1_000_000


def parse_retry_on(value: str) -> frozenset[str]:
    """The known conditions in a comma-separated retry_on (unknown ones are ignored, as Envoy does)."""
    return frozenset(c.strip() for c in value.split(",") if c.strip() in _KNOWN)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout_ms: int = 0
    retriable_status_codes: frozenset[int] = frozenset()
    base_interval_ms: int = DEFAULT_BASE_INTERVAL_MS
    max_interval_ms: int = DEFAULT_BASE_INTERVAL_MS * 10
    # envoy.retry_host_predicates.previous_hosts: a retry avoids the hosts already tried,
    # re-picking up to host_selection_retry_max_attempts times.
    avoid_previous_hosts: bool = False
    host_selection_retry_max_attempts: int = 1

    @classmethod
    def from_proto(cls, p: Any) -> "RetryPolicy":
        base = _ms(p.retry_back_off.base_interval) if p.retry_back_off.HasField("base_interval") else (
            DEFAULT_BASE_INTERVAL_MS
        )
        maximum = _ms(p.retry_back_off.max_interval) if p.retry_back_off.HasField("max_interval") else base * 10
        return cls(
            retry_on=parse_retry_on(p.retry_on),
            num_retries=p.num_retries.value if p.HasField("num_retries") else 1,
            per_try_timeout_ms=_ms(p.per_try_timeout) if p.HasField("per_try_timeout") else 0,
            retriable_status_codes=frozenset(p.retriable_status_codes),
            base_interval_ms=max(1, base),
            max_interval_ms=max(base, maximum),
            avoid_previous_hosts=any(
                pred.name == "envoy.retry_host_predicates.previous_hosts"
                or pred.typed_config.type_url.endswith("PreviousHostsPredicate")
                for pred in p.retry_host_predicate
            ),
            host_selection_retry_max_attempts=max(1, p.host_selection_retry_max_attempts or 1),
        )


@dataclass(slots=True)
class RetryState:
    """Retry decisions for one downstream request."""

    policy: RetryPolicy
    retry_on: frozenset[str]
    retries_remaining: int
    rng: random.Random = field(default_factory=random.Random)
    _backoff_step: int = 1

    @classmethod
    def create(cls, policy: RetryPolicy | None, headers: HeaderMap) -> "RetryState | None":
        """The state for a request, or None when nothing can be retried. Removes the x-envoy retry headers."""
        retry_on = policy.retry_on if policy is not None else frozenset()
        num = policy.num_retries if policy is not None else 1
        header_on = headers.get("x-envoy-retry-on")
        if header_on is not None:
            retry_on = retry_on | parse_retry_on(header_on)
        header_max = headers.get("x-envoy-max-retries")
        if header_max is not None and header_max.isdigit():
            num = int(header_max)
        if header_on is not None:
            headers.remove("x-envoy-retry-on")
        if header_max is not None:
            headers.remove("x-envoy-max-retries")
        if not retry_on or num <= 0:
            return None
        return cls(policy or RetryPolicy(), retry_on, num)

    def would_retry_reset(self, reason: StreamResetReason) -> bool:
        if reason is StreamResetReason.Overflow:
            return False
        on = self.retry_on
        if "reset" in on or "5xx" in on or "gateway-error" in on:
            return True
        return "connect-failure" in on and reason in _CONNECT_FAILURES

    def would_retry_per_try_timeout(self) -> bool:
        on = self.retry_on
        return "5xx" in on or "gateway-error" in on or "reset" in on

    def would_retry_headers(self, status: int, headers: HeaderMap) -> bool:
        if "x-envoy-overloaded" in headers:
            return False
        on = self.retry_on
        if "5xx" in on and status >= 500:
            return True
        if "gateway-error" in on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        if "retriable-status-codes" in on and status in self.policy.retriable_status_codes:
            return True
        return "envoy-ratelimited" in on and "x-envoy-ratelimited" in headers

    def next_backoff_ms(self) -> int:
        """Fully jittered exponential back-off: uniform in [0, base * (2^n - 1)), capped at max."""
        ceiling = self.policy.base_interval_ms * ((1 << self._backoff_step) - 1)
        if ceiling <= self.policy.max_interval_ms:
            self._backoff_step += 1
        ceiling = min(ceiling, self.policy.max_interval_ms)
        return self.rng.randrange(ceiling) if ceiling > 0 else 0
