"""Hostile clients and upstream faults, run through real Envoy and wasmproxy on one config
(tests/diff_cases/hostile_clients.yaml): request smuggling, slow clients (slowloris headers and
bodies), idle and request timeouts, circuit breakers, half-closed sockets and upstream resets
must get Envoy's answers, and afterwards no connection, stream or upstream request may be left
active (the admin gauges return to zero within a bounded deadline), the pooled upstream
connections must equal Envoy's, and the worker still serves.

Trickling bytes with a pause between sends is the scenario itself; the pause is a bounded
select() on the socket, so a response that arrives early ends the trickle at once.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support.cases import CANDIDATE, REFERENCE, Case, CaseFile, DiffEnvironment, Target, case_params, selected_targets
from support.ports import free_port
from support.raw_http import PeerClosed, RawConnection, build_request

pytestmark = pytest.mark.envoy

CASES_DIR = Path(__file__).parent / "diff_cases"
CASES = CaseFile.load(CASES_DIR / "hostile_clients.yaml")
HEADER_TIMEOUTS = CaseFile.load(CASES_DIR / "hostile_header_timeouts.yaml")
MAX_CONNECTIONS = CaseFile.load(CASES_DIR / "hostile_max_connections.yaml")
# Gauges that must return to zero once every client is gone (per HCM stat prefix / cluster).
LEAK_GAUGES = ("http.ingress_http.downstream_cx_active", "http.ingress_http.downstream_rq_active",
               "cluster.echo.upstream_rq_active", "cluster.limited.upstream_rq_active",
               "cluster.limited.upstream_rq_pending_active")
# Idle keep-alive upstream connections stay pooled: these must equal Envoy's instead.
POOL_GAUGES = ("cluster.echo.upstream_cx_active", "cluster.limited.upstream_cx_active")
GAUGE_DEADLINE_S = 5.0
# Longest any scenario waits for the proxy to act (the longest configured timeout is 1.2 s).
ANSWER_DEADLINE_S = 4.0
CLOSE_WAIT_S = 3.0
# How far a proxy's timer may fire from Envoy's on a loaded two-core machine.
TIME_TOLERANCE_S = 0.25


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(CASES, tmp_path_factory.mktemp("hostile"), echo_upstream, free_port()) as e:
        yield e


@pytest.fixture(scope="module")
def header_timeouts_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(HEADER_TIMEOUTS, tmp_path_factory.mktemp("hostile_headers"), echo_upstream,
                         free_port()) as e:
        yield e


@pytest.fixture(scope="module")
def max_connections_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(MAX_CONNECTIONS, tmp_path_factory.mktemp("hostile_max_cx"), echo_upstream,
                         free_port()) as e:
        yield e


def gauges(target: Target, names: tuple[str, ...] = LEAK_GAUGES) -> dict[str, int]:
    """Gauges `names` of one target (0 when absent), read from its admin /stats."""
    text = target.process.admin("/stats?filter=_active$").body.decode()
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(values.get(name, "0")) for name in names}


def counter(target: Target, name: str) -> int:
    """One stat of one target (0 when absent)."""
    text = target.process.admin(f"/stats?filter=^{name}$").body.decode()
    return int(text.split(": ", 1)[1]) if ": " in text else 0


def assert_pools_match(env: DiffEnvironment) -> None:
    """Every target ends up with as many upstream connections as Envoy (within GAUGE_DEADLINE_S)."""
    if REFERENCE not in env.targets:
        return
    deadline = time.monotonic() + GAUGE_DEADLINE_S
    while True:
        values = {name: gauges(t, POOL_GAUGES) for name, t in env.targets.items()}
        if all(v == values[REFERENCE] for v in values.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"upstream connections differ from Envoy's: {values}")
        select.select([], [], [], 0.05)


def assert_drained(target: Target) -> None:
    """Every LEAK_GAUGE reaches zero within GAUGE_DEADLINE_S and a plain request still works."""
    deadline = time.monotonic() + GAUGE_DEADLINE_S
    while True:
        got = gauges(target)
        if not any(got.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{target.name}: still active after {GAUGE_DEADLINE_S}s: "
                                 f"{ {k: v for k, v in got.items() if v} }")
        # Poll the admin endpoint again: the proxy closes sockets on its own timers.
        select.select([], [], [], 0.05)
    with target.connect() as conn:
        assert conn.request("GET", "/echo/health").status == 200, target.name


def wait_gauge(target: Target, name: str, value: int) -> None:
    deadline = time.monotonic() + GAUGE_DEADLINE_S
    while gauges(target)[name] != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{target.name}: {name} never reached {value}")
        select.select([], [], [], 0.02)


def on_every_target(env: DiffEnvironment, scenario: Callable[[Target], Any],
                    timed: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run `scenario` against every target side by side, then check each one drained; the
    results (one per target) must equal Envoy's, except the durations at indices `timed`, which
    must be within TIME_TOLERANCE_S of Envoy's."""
    with ThreadPoolExecutor(max_workers=len(env.targets)) as pool:
        futures = {name: pool.submit(scenario, t) for name, t in env.targets.items()}
        results = {name: f.result() for name, f in futures.items()}
        for f in [pool.submit(assert_drained, t) for t in env.targets.values()]:
            f.result()
    assert_pools_match(env)
    if REFERENCE not in results:
        return results
    ref = results[REFERENCE]
    at = {i % len(ref) for i in timed}
    for name, got in results.items():
        if not at:
            assert got == ref, f"{name} differs from Envoy: {got!r} != {ref!r}"
            continue
        assert [v for i, v in enumerate(got) if i not in at] == [v for i, v in enumerate(ref) if i not in at], \
            f"{name} differs from Envoy: {got!r} != {ref!r}"
        for i in at:
            assert (got[i] is None) == (ref[i] is None), f"{name} differs from Envoy: {got!r} != {ref!r}"
            if ref[i] is not None:
                assert abs(got[i] - ref[i]) < TIME_TOLERANCE_S, f"{name}: after {got[i]:.2f}s, Envoy {ref[i]:.2f}s"
    return results


def closed_after(conn: RawConnection) -> float | None:
    """Seconds until the peer closes `conn` (None: not within CLOSE_WAIT_S)."""
    start = time.monotonic()
    return time.monotonic() - start if conn.closed_by_peer(CLOSE_WAIT_S) else None


def outcome(conn: RawConnection, method: str = "GET") -> tuple[Any, ...]:
    """What the proxy did next: ("response", status, body, closed-after) or ("closed", bytes seen)."""
    try:
        resp = conn.read_response(method, timeout=ANSWER_DEADLINE_S)
    except PeerClosed as e:
        if e.partial is not None:
            return ("truncated", e.partial.status)
        return ("closed", len(e.received))
    return ("response", resp.status, resp.body, conn.closed_by_peer(3.0))


def trickle(conn: RawConnection, data: bytes, pause_s: float) -> bool:
    """Send `data` one byte at a time, `pause_s` apart; stop early (False) once the proxy answers
    or closes. True when every byte went out."""
    for i in range(len(data)):
        try:
            conn.send(data[i:i + 1])
        except PeerClosed:
            return False
        readable, _, _ = select.select([conn.sock], [], [], pause_s)
        if readable:
            return False
    return True


# --- request/response cases ------------------------------------------------------------------

@pytest.mark.parametrize("case", case_params(CASES))
def test_hostile_case(env: DiffEnvironment, case: Case) -> None:
    env.run(case)
    for target in env.targets.values():
        assert_drained(target)
    assert_pools_match(env)


@pytest.mark.parametrize("case", case_params(HEADER_TIMEOUTS))
def test_header_timeouts_case(header_timeouts_env: DiffEnvironment, case: Case) -> None:
    header_timeouts_env.run(case)


@pytest.mark.parametrize("case", case_params(MAX_CONNECTIONS))
def test_max_connections_case(max_connections_env: DiffEnvironment, case: Case) -> None:
    max_connections_env.run(case)


def test_oversized_request_line(env: DiffEnvironment) -> None:
    """A 70 KB request target counts against max_request_headers_kb (60 KB)."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(build_request("GET", "/echo/" + "a" * 70_000))
            return outcome(conn)

    assert on_every_target(env, scenario)[REFERENCE][:2] == ("response", 431)


# --- slow clients ------------------------------------------------------------------------------

def test_slowloris_headers_hit_stream_idle_timeout(env: DiffEnvironment) -> None:
    """Header bytes every 50 ms that never complete the block are no stream activity for Envoy
    (its idle timer moves on decoded headers and data only): stream_idle_timeout (0.4 s) answers
    408 before request_headers_timeout (0.8 s)."""
    head = build_request("GET", "/echo/slow", [("x-pad", "p" * 200)])

    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            start = time.monotonic()
            finished = trickle(conn, head[:-2], 0.05)
            return (finished, *outcome(conn), time.monotonic() - start)

    results = on_every_target(env, scenario, timed=(5,))
    assert results[REFERENCE][:4] == (False, "response", 408, b"stream timeout")


def test_slowloris_headers_hit_request_headers_timeout(header_timeouts_env: DiffEnvironment) -> None:
    """With a long stream idle timeout, trickled headers meet request_headers_timeout (0.5 s)."""
    head = build_request("GET", "/echo/slow", [("x-pad", "p" * 200)])

    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            start = time.monotonic()
            finished = trickle(conn, head[:-2], 0.05)
            return (finished, *outcome(conn), time.monotonic() - start)

    results = on_every_target(header_timeouts_env, scenario, timed=(-1,))
    assert results[REFERENCE][0] is False


def test_headers_complete_in_time_then_slow_body_meets_request_timeout(header_timeouts_env: DiffEnvironment) -> None:
    """request_headers_timeout stops at the end of the headers; a body trickled past
    request_timeout (1 s) gets 408."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            start = time.monotonic()
            conn.send(build_request("POST", "/echo/upload", [("content-length", "100")]))
            finished = trickle(conn, b"x" * 100, 0.1)
            return (finished, *outcome(conn, "POST"), time.monotonic() - start)

    results = on_every_target(header_timeouts_env, scenario, timed=(-1,))
    assert results[REFERENCE][:4] == (False, "response", 408, b"request timeout")


def test_slowloris_body_hits_request_timeout(env: DiffEnvironment) -> None:
    """A body trickled one byte per 100 ms never idles the stream (0.4 s) but request_timeout
    (1.2 s) ends it with a 408."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(build_request("POST", "/echo/upload", [("content-length", "100")]))
            finished = trickle(conn, b"x" * 100, 0.1)
            return (finished, *outcome(conn, "POST"))

    results = on_every_target(env, scenario)
    assert results[REFERENCE][:3] == (False, "response", 408)


def test_stalled_body_hits_stream_idle_timeout(env: DiffEnvironment) -> None:
    """Part of a body, then silence: stream_idle_timeout (0.4 s) answers 408."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(build_request("POST", "/echo/upload", [("content-length", "10")]) + b"abc")
            start = time.monotonic()
            result = outcome(conn, "POST")
            return (*result, time.monotonic() - start < 1.0)

    results = on_every_target(env, scenario)
    assert results[REFERENCE][:2] == ("response", 408)


def test_stalled_headers_hit_stream_idle_timeout(env: DiffEnvironment) -> None:
    """Half a header block, then silence."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(b"GET /echo/x HTTP/1.1\r\nHost: diff.test\r\nx-a: 1")
            return outcome(conn)

    assert on_every_target(env, scenario)[REFERENCE][:3] == ("response", 408, b"stream timeout")


def test_many_slow_clients_do_not_stall_the_worker(env: DiffEnvironment) -> None:
    """Twenty connections holding half a header block each: a normal request on the same worker
    is still answered at once, and every slow one later gets its 408."""
    def scenario(target: Target) -> tuple[Any, ...]:
        slow = [target.connect() for _ in range(20)]
        try:
            for conn in slow:
                conn.send(b"GET /echo/slow HTTP/1.1\r\nHost: diff.test\r\nx-a: 1")
            with target.connect(timeout=0.3) as fast:
                status = fast.request("GET", "/echo/fast").status
            return (status, sorted({outcome(conn)[:3] for conn in slow}))
        finally:
            for conn in slow:
                conn.close()

    results = on_every_target(env, scenario)
    assert results[REFERENCE] == (200, [("response", 408, b"stream timeout")])


# --- idle connections -------------------------------------------------------------------------

def test_idle_keep_alive_connection_drained_then_closed(env: DiffEnvironment) -> None:
    """A keep-alive connection idle for idle_timeout (0.6 s) after a response starts Envoy's drain
    sequence: drain_timeout (0.3 s), then a delayed close (0.3 s)."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            return (conn.request("GET", "/echo/a").status, closed_after(conn))

    results = on_every_target(env, scenario, timed=(1,))
    assert results[REFERENCE][0] == 200 and results[REFERENCE][1] is not None


def test_request_while_draining_after_idle_timeout_gets_connection_close(env: DiffEnvironment) -> None:
    """Between idle_timeout and the end of drain_timeout the connection still serves, but the
    response carries connection: close; the close still waits for drain_timeout."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            first = conn.request("GET", "/echo/a")
            before = counter(target, "http.ingress_http.downstream_cx_idle_timeout")
            deadline = time.monotonic() + GAUGE_DEADLINE_S
            while counter(target, "http.ingress_http.downstream_cx_idle_timeout") == before:
                assert time.monotonic() < deadline, f"{target.name}: no idle timeout"
                select.select([], [], [], 0.02)
            second = conn.request("GET", "/echo/b")
            return (first.header("connection"), second.status, second.header("connection"), closed_after(conn))

    results = on_every_target(env, scenario, timed=(3,))
    assert results[REFERENCE][:3] == (None, 200, "close") and results[REFERENCE][3] is not None


def test_connection_without_request_closed_when_idle(env: DiffEnvironment) -> None:
    """A connection that never sent a byte has no codec yet: idle_timeout closes it at once."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            return (closed_after(conn),)

    assert on_every_target(env, scenario, timed=(0,))[REFERENCE][0] is not None


# --- half-closed sockets ----------------------------------------------------------------------

def test_half_close_after_full_request(env: DiffEnvironment) -> None:
    """The client shuts its write side once the request is out: HTTP/1 downstream connections
    don't support half-close in Envoy, so the FIN closes them and no response comes."""
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(build_request("GET", "/echo/hc", [("x-echo-delay-ms", "100")]))
            conn.sock.shutdown(socket.SHUT_WR)
            return outcome(conn)

    assert on_every_target(env, scenario)[REFERENCE] == ("closed", 0)


def test_half_close_mid_body(env: DiffEnvironment) -> None:
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(build_request("POST", "/echo/hc", [("content-length", "10")]) + b"abc")
            conn.sock.shutdown(socket.SHUT_WR)
            return outcome(conn, "POST")

    assert on_every_target(env, scenario)[REFERENCE] == ("closed", 0)


def test_half_close_mid_headers(env: DiffEnvironment) -> None:
    def scenario(target: Target) -> tuple[Any, ...]:
        with target.connect() as conn:
            conn.send(b"GET /echo/x HTTP/1.1\r\nHost: diff")
            conn.sock.shutdown(socket.SHUT_WR)
            return outcome(conn)

    assert on_every_target(env, scenario)[REFERENCE] == ("closed", 0)


def test_client_abort_while_upstream_is_slow(env: DiffEnvironment) -> None:
    """The client vanishes while the upstream is still thinking: the upstream request is
    cancelled and nothing stays active."""
    def scenario(target: Target) -> int:
        with target.connect() as conn:
            conn.send(build_request("GET", "/echo/abort", [("x-echo-delay-ms", "300")]))
            wait_gauge(target, "http.ingress_http.downstream_rq_active", 1)
        return 0

    on_every_target(env, scenario)


# --- circuit breakers ---------------------------------------------------------------------------

def test_circuit_breaker_overflow_gets_503_overloaded(env: DiffEnvironment) -> None:
    """Cluster `limited` allows one connection, one request and one pending request: with one in
    flight and one queued, a third is refused with 503 and x-envoy-overloaded."""
    def scenario(target: Target) -> tuple[Any, ...]:
        slow = [("x-echo-delay-ms", "500")]
        with target.connect() as a, target.connect() as b, target.connect() as c:
            a.send(build_request("GET", "/limited/a", slow))
            wait_gauge(target, "cluster.limited.upstream_rq_active", 1)
            b.send(build_request("GET", "/limited/b", slow))
            wait_gauge(target, "cluster.limited.upstream_rq_pending_active", 1)
            over = c.request("GET", "/limited/c")
            return (a.read_response().status, b.read_response().status, over.status,
                    over.header("x-envoy-overloaded"), over.body,
                    counter(target, "cluster.limited.upstream_rq_pending_overflow"))

    results = on_every_target(env, scenario)
    assert results[REFERENCE][:4] == (200, 200, 503, "true") and results[REFERENCE][5] == 1


def test_client_that_stops_reading_a_large_response(env: DiffEnvironment) -> None:
    """A client reads the response headers of a large body, then goes away: the upstream request
    is released."""
    def scenario(target: Target) -> bytes:
        with target.connect() as conn:
            conn.send(build_request("GET", "/echo/big", [("x-echo-body-size", str(4 << 20))]))
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.sock.recv(4096)
            return head.split(b"\r\n", 1)[0]

    assert on_every_target(env, scenario)[REFERENCE] == b"HTTP/1.1 200 OK"


# --- connection limits ------------------------------------------------------------------------

def test_global_downstream_max_connections(max_connections_env: DiffEnvironment) -> None:
    """With two connections open, a third is accepted and closed at once; once one of the two
    goes, a new connection is served again."""
    def scenario(target: Target) -> tuple[Any, ...]:
        first, second = target.connect(), target.connect()
        try:
            statuses = [first.request("GET", "/echo/1").status, second.request("GET", "/echo/2").status]
            with target.connect() as third:
                try:
                    third.send(build_request("GET", "/echo/3"))
                    over = outcome(third)
                except PeerClosed:
                    over = ("closed", 0)
            first.close()
            wait_gauge(target, "http.ingress_http.downstream_cx_active", 1)
            with target.connect() as again:
                statuses.append(again.request("GET", "/echo/4").status)
            return (*statuses, over)
        finally:
            first.close()
            second.close()

    results = on_every_target(max_connections_env, scenario)
    assert results[REFERENCE] == (200, 200, 200, ("closed", 0))
