"""Fuzzing the host-function boundary: random pointers, lengths, types and ids into every
Proxy-Wasm host function, through the WAT trampoline guest (tests/wasm_host/guest.py), from
inside a stream callback, with a bounded number of examples.

Invariants: every call returns a WasmResult code, no Python exception reaches the test nor is
caught by the host-call guard (which would log "wasm host call ... failed": a host bug), the VM
never fails (a host call cannot trap the guest: only the guest's own allocator could), and the
same VM keeps answering afterwards.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wasm_host.fakes import FakeStreamEnv, FakeTime, FakeTimers, FakeWasmEnv, stream_info
from tests.wasm_host.guest import BAD_PTR, HEAP, HOST_SIGS, SCRATCH, Guest
from wasmproxy.http.headers import HeaderMap
from wasmproxy.log import get_logger
from wasmproxy.wasm.abi import WasmResult

_V021 = sorted(n for n in HOST_SIGS if n not in {"proxy_get_configuration", "proxy_continue_request",
                                                   "proxy_continue_response", "proxy_clear_route_cache"})
_RESULTS = {int(r) for r in WasmResult}

_u32 = st.one_of(
    st.integers(0, 12),                                   # types, levels, small ids and sizes
    st.integers(SCRATCH, HEAP - 64),                      # valid pointers into scratch
    st.sampled_from([BAD_PTR, 0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, 4 * 65536, 4 * 65536 - 1]),
    st.integers(0, 0xFFFF_FFFF),
)
_i64 = st.one_of(st.integers(-3, 3), st.integers(-(1 << 63), (1 << 63) - 1))


@st.composite
def _host_call(draw: Any) -> tuple[str, tuple[int, ...]]:
    name = draw(st.sampled_from(_V021))
    params, _ = HOST_SIGS[name]
    return name, tuple(draw(_i64 if p == "I" else _u32) for p in params)


class _Target:
    """One guest, one stream context with headers and a body, reused across examples."""

    def __init__(self) -> None:
        self.g = Guest(timer_factory=FakeTimers(), time_source=FakeTime(), environment=FakeWasmEnv())
        self.g.put(b"x-a\0:path\0request\0headers\0" + bytes(range(256)) * 8)
        self.env = FakeStreamEnv(stream_info())
        self.ctx = self.g.wasm.create_stream_context(self.g.plugin, self.env)
        self.ctx.on_create()
        self.ctx.request_headers = HeaderMap([(":path", "/"), ("x-a", "1")])


class _HostBugs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("wasm host call") or record.exc_info:
            self.lines.append(message)


@pytest.fixture(scope="module")
def target() -> Iterator[_Target]:
    yield _Target()


@pytest.fixture(scope="module")
def host_bugs() -> Iterator[_HostBugs]:
    handler = _HostBugs()
    get_logger("wasm").addHandler(handler)
    yield handler
    get_logger("wasm").removeHandler(handler)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(_host_call(), min_size=1, max_size=4))
def test_random_arguments_into_every_host_function(target: _Target, host_bugs: _HostBugs, calls: list[tuple[str, tuple[int, ...]]]) -> None:
    g, ctx = target.g, target.ctx
    host_bugs.lines.clear()
    results: list[int] = []

    def on_headers(*_: int) -> int:
        for name, args in calls:
            results.append(g.hostcall(name, *args))
        return 0

    g.handlers["proxy_on_request_headers"] = on_headers
    ctx.on_request_headers(0, True)
    assert len(results) == len(calls)
    assert set(results) <= _RESULTS, list(zip(calls, results))
    assert not g.wasm.is_failed(), g.wasm.fail_message
    assert host_bugs.lines == [], (calls, host_bugs.lines)
    # The VM is still usable: a plain host call answers Ok.
    assert g.call(ctx, "proxy_log", 2, SCRATCH, 3) == WasmResult.Ok


def test_every_host_function_is_fuzzed() -> None:
    assert set(_V021) >= {"proxy_log", "proxy_get_header_map_pairs", "proxy_set_buffer_bytes", "proxy_http_call",
                          "proxy_call_foreign_function", "proxy_set_effective_context", "proxy_done"}
