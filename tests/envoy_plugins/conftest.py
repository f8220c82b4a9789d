"""Run every plugin test on each selected proxy (envoy_harness.selected_proxies): real Envoy
1.40 pins the behaviour, and the very same assertions then pin wasmproxy.

A wasmproxy difference from Envoy that is known and explained is a strict xfail, listed in
KNOWN_DIFFERENCES by test name (with its parameters); docs/compatibility.md says which
differences are kept on purpose.
"""

from __future__ import annotations

import pytest
from envoy_harness import selected_proxies

# test id (as pytest shows it, without the proxy parameter) -> the exact difference.
KNOWN_DIFFERENCES: dict[str, str] = {}


@pytest.fixture(scope="module", params=selected_proxies())
def proxy(request: pytest.FixtureRequest) -> str:
    """The proxy this module's processes run: "envoy" or "wasmproxy"."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("proxy") != "wasmproxy":
            continue
        name = item.name.replace("[wasmproxy-", "[").replace("-wasmproxy]", "]").replace("[wasmproxy]", "")
        reason = KNOWN_DIFFERENCES.get(name)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=f"wasmproxy differs from Envoy: {reason}", strict=True))
