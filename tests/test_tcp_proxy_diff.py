"""Differential tests of L4 proxying and the WasmService pattern: the same bootstrap through real
Envoy 1.40 and through wasmproxy must behave the same on the wire and in the stats compared.

One bootstrap, four listeners: tcp_proxy alone to a TCP echo upstream; the tcp_filter Wasm
network filter before tcp_proxy; tcp_proxy to a port nobody listens on; and an HTTP listener
whose Wasm filter (root_id "reader") reads what a singleton WasmService (root_id "service",
same vm_id) put in SharedData from its timer, its http_call and its shared queue.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.ports import LOOPBACK, free_ports
from support.processes import EnvoyProcess, ProxyProcess, WasmproxyProcess
from support.raw_http import RawConnection

pytestmark = pytest.mark.envoy

POLL_DEADLINE_S = 10.0


class TcpEcho:
    """A TCP echo server on loopback: echoes bytes, answers a FIN with a FIN."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


class TokenServer:
    """An HTTP/1.1 upstream answering every request with body "abc" (the service's http_call)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            try:
                while data := conn.recv(65536):
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc")
            except OSError:
                pass

    def stop(self) -> None:
        self.sock.close()


def _cluster(name: str, port: int, http: bool = False) -> dict[str, Any]:
    return {"name": name, "connect_timeout": "1s", "load_assignment": {"cluster_name": name, "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}]}}


def _tcp_proxy(prefix: str, cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": prefix, "cluster": cluster}}


def _plugin(name: str, wasm: str, root_id: str, config: str, vm_id: str) -> dict[str, Any]:
    return {"name": name, "root_id": root_id,
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config},
            "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": wasm}}}}


def _listener(name: str, port: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
            "filter_chains": [{"filters": filters}]}


ACCESS_LOG_FORMAT = "%UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST%\n"


def _with_access_log(tcp_proxy: dict[str, Any], path: str) -> dict[str, Any]:
    tcp_proxy["typed_config"]["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path, "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}]
    return tcp_proxy


def bootstrap(ports: dict[str, int], echo: int, token: int, http_echo: int, dead: int,
              access_log: str = "/dev/null") -> dict[str, Any]:
    from plugins.build import plugin_path

    tcp_filter, service = plugin_path("tcp_filter"), plugin_path("tcp_service")
    wasm_filter = {"name": "envoy.filters.network.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "config": _plugin("tcpf", tcp_filter, "", "prefix [p]\nmagic QUIT\nhold HOLD\nupper", "tcpvm")}}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "svc",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "http_echo"}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.wasm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": _plugin("reader", service, "reader", "vm_id svc", "svc")}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": ports["admin"]}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService", "singleton": True,
            "config": _plugin("service", service, "service", "period 10\ntoken tok\ncluster token", "svc")}}],
        "static_resources": {
            "listeners": [
                _listener("plain", ports["plain"], [_with_access_log(_tcp_proxy("plain", "echo"), access_log)]),
                _listener("wasm", ports["wasm"], [wasm_filter, _with_access_log(_tcp_proxy("wasm", "echo"), access_log)]),
                _listener("dead", ports["dead"], [_with_access_log(_tcp_proxy("dead", "dead"), access_log)]),
                _listener("http", ports["http"], [hcm]),
            ],
            "clusters": [_cluster("echo", echo), _cluster("dead", dead), _cluster("token", token),
                         _cluster("http_echo", http_echo)],
        },
    }


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _recv_end(sock: socket.socket) -> str:
    """How the peer ended: 'eof' (FIN) or 'reset'; bytes before it are returned too."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        return f"reset:{got!r}"
    return f"eof:{got!r}"


def exercise_tcp(ports: dict[str, int]) -> list[Any]:
    """The client side of the L4 cases; returns what it saw, in order."""
    seen: list[Any] = []
    with socket.create_connection((LOOPBACK, ports["plain"]), timeout=5) as s:
        s.sendall(b"hello")
        seen.append(_recv_exactly(s, 5))
        s.shutdown(socket.SHUT_WR)
        seen.append(_recv_end(s))
    with socket.create_connection((LOOPBACK, ports["wasm"]), timeout=5) as s:
        s.sendall(b"hello")
        seen.append(_recv_exactly(s, 8))  # prefixed upstream-bound, upper-cased on the way back
        s.sendall(b"HOLD1")
        s.sendall(b"release")
        seen.append(_recv_exactly(s, 12))  # held, then released together
        s.sendall(b"QUIT")
        seen.append(_recv_end(s))
    with socket.create_connection((LOOPBACK, ports["dead"]), timeout=5) as s:
        seen.append(_recv_end(s))
    return seen


def _poll(fetch: Any, ok: Any) -> Any:
    """Calls fetch() until ok(value) or the deadline (state inside another process)."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    value = fetch()
    while not ok(value) and time.monotonic() < deadline:
        threading.Event().wait(0.02)
        value = fetch()
    return value


def exercise_service(port: int) -> list[Any]:
    def get(headers: list[tuple[str, str]] | None = None) -> tuple[str | None, str | None]:
        with RawConnection(LOOPBACK, port) as c:
            r = c.request("GET", "/", headers=[("host", "x")] + (headers or []))
            return r.header("x-service-token"), r.header("x-service-last-item")

    seen: list[Any] = [_poll(get, lambda v: v[0] == "tok-abc")[0]]
    get([("x-enqueue", "item1")])
    seen.append(_poll(get, lambda v: v[1] == "item1")[1])
    return seen


STAT_NAMES = [
    *(f"tcp.{p}.{n}" for p in ("plain", "wasm", "dead") for n in (
        "downstream_cx_total", "downstream_cx_rx_bytes_total", "downstream_cx_tx_bytes_total", "idle_timeout",
        "downstream_cx_no_route", "upstream_flush_total")),
    *(f"cluster.echo.{n}" for n in (
        "upstream_cx_total", "upstream_cx_rx_bytes_total", "upstream_cx_tx_bytes_total", "upstream_rq_total",
        "upstream_cx_destroy", "upstream_cx_active", "upstream_rq_active")),
    *(f"cluster.dead.{n}" for n in (
        "upstream_cx_total", "upstream_cx_connect_fail", "upstream_cx_connect_attempts_exceeded",
        "upstream_rq_pending_failure_eject", "upstream_cx_active")),
    *(f"wasmcustom.{n}" for n in (
        "tcp_filter.connections", "tcp_filter.downstream_close", "tcp_filter.upstream_close", "tcp_filter.logs",
        "tcp_filter.downstream_bytes", "tcp_filter.upstream_bytes", "service.configured")),
]


def stats_of(proc: ProxyProcess) -> dict[str, str]:
    lines = proc.admin("/stats").body.decode().splitlines()
    values = dict(line.split(": ", 1) for line in lines if ": " in line)
    return {name: values.get(name, "absent") for name in STAT_NAMES}


def run_all(proc_cls: type[ProxyProcess], workdir: Path, upstreams: dict[str, int]) -> dict[str, Any]:
    import yaml

    names = ("admin", "plain", "wasm", "dead", "http")
    ports = dict(zip(names, free_ports(len(names))))
    path = workdir / f"{proc_cls.__name__}.yaml"
    access_log = workdir / f"{proc_cls.__name__}.access.log"
    path.write_text(yaml.safe_dump(bootstrap(ports, **upstreams, access_log=str(access_log))))
    with proc_cls(path, log_level="info") as proc:
        def plugin_log() -> list[str]:
            return [line.split("tcp_filter ", 1)[1] for line in proc.log_text().splitlines() if "tcp_filter " in line]

        _poll(plugin_log, lambda lines: "log" in lines)  # the readiness probe's connection is over
        tcp = exercise_tcp(ports)
        service = exercise_service(ports["http"])
        # Closes are counted when each side has noticed them: wait for the last one.
        stats = _poll(lambda: stats_of(proc), lambda s: s["wasmcustom.tcp_filter.logs"] == "2"
                      and s["cluster.echo.upstream_cx_active"] == "0")
        log = plugin_log()
    # Sorted: the readiness probe's connections end in no fixed order relative to ours.
    log_lines = sorted(access_log.read_text().splitlines())
    return {"tcp": tcp, "service": service, "stats": stats, "plugin_log": log, "access_log": log_lines}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[dict[str, dict[str, Any]]]:
    from plugins.build import build

    build(["tcp_filter", "tcp_service"])
    echo, token = TcpEcho(), TokenServer()
    upstreams = {"echo": echo.port, "token": token.port, "http_echo": echo_upstream, "dead": free_ports(1)[0]}
    workdir = tmp_path_factory.mktemp("tcp_diff")
    try:
        yield {"envoy": run_all(EnvoyProcess, workdir, upstreams),
               "wasmproxy": run_all(WasmproxyProcess, workdir, upstreams)}
    finally:
        echo.stop()
        token.stop()


def test_tcp_wire_behaviour_matches_envoy(results: dict[str, dict[str, Any]]) -> None:
    expected = [b"hello", "eof:b''", b"[P]HELLO", b"HOLD1RELEASE", "eof:b''", "eof:b''"]
    assert results["envoy"]["tcp"] == expected  # the scenario means what it says
    assert results["wasmproxy"]["tcp"] == expected


def test_wasm_service_pattern_matches_envoy(results: dict[str, dict[str, Any]]) -> None:
    assert results["envoy"]["service"] == ["tok-abc", "item1"]
    assert results["wasmproxy"]["service"] == ["tok-abc", "item1"]


def test_tcp_and_plugin_stats_match_envoy(results: dict[str, dict[str, Any]]) -> None:
    assert results["wasmproxy"]["stats"] == results["envoy"]["stats"]
    envoy = results["envoy"]["stats"]
    assert envoy["wasmcustom.tcp_filter.upstream_bytes"] not in ("absent", "0")
    assert envoy["wasmcustom.service.configured"] not in ("absent", "0")


def test_wasm_network_callback_sequence_matches_envoy(results: dict[str, dict[str, Any]]) -> None:
    """The plugin logs every callback with its arguments (sizes, end_of_stream, close types)."""
    envoy = results["envoy"]["plugin_log"]
    assert "downstream_data 12 0" in envoy  # HOLD1 held, then released with what followed
    assert results["wasmproxy"]["plugin_log"] == envoy


class Sink:
    """An upstream that accepts and never reads (its peer's writes back up)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def drain(self, index: int) -> str:
        """Reads accepted connection `index` to its end: 'eof' or 'reset'."""
        conn = self.conns[index]
        conn.settimeout(POLL_DEADLINE_S)
        try:
            while conn.recv(1 << 20):
                pass
        except ConnectionResetError:
            return "reset"
        return "eof"

    def stop(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class Resetter:
    """An upstream that reads one chunk, then resets the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        try:
            if conn.recv(100):
                conn.sendall(b"bye")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.close()

    def stop(self) -> None:
        self.sock.close()


class Blackhole:
    """An address whose accept queue is full, so new connects hang (a connect timeout)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((LOOPBACK, self.port))
            self.fillers.append(c)

    def stop(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


def limits_bootstrap(ports: dict[str, int], echo: int, sink: int, dead: int, resetter: int,
                     blackhole: int) -> dict[str, Any]:
    def proxy(prefix: str, **extra: Any) -> dict[str, Any]:
        f = _tcp_proxy(prefix, extra.pop("cluster", "echo"))
        f["typed_config"].update(extra)
        return f

    weighted = proxy("weighted")
    del weighted["typed_config"]["cluster"]
    weighted["typed_config"]["weighted_clusters"] = {"clusters": [{"name": "echo", "weight": 1},
                                                                  {"name": "echo2", "weight": 1}]}
    flow = _listener("flow", ports["flow"], [proxy("flow", cluster="sink")])
    flow["per_connection_buffer_limit_bytes"] = 16384
    sink_cluster = _cluster("sink", sink)
    sink_cluster["per_connection_buffer_limit_bytes"] = 16384
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": ports["admin"]}}},
        "static_resources": {
            "listeners": [
                _listener("idle", ports["idle"], [proxy("idle", idle_timeout="0.3s")]),
                _listener("noroute", ports["noroute"], [proxy("noroute", cluster="missing")]),
                _listener("retry", ports["retry"], [proxy("retry", cluster="dead", max_connect_attempts=3)]),
                _listener("weighted", ports["weighted"], [weighted]),
                flow,
                _listener("rst", ports["rst"], [proxy("rst", cluster="resetter")]),
                _listener("timeout", ports["timeout"], [proxy("timeout", cluster="blackhole")]),
                _listener("maxdur", ports["maxdur"], [proxy("maxdur", max_downstream_connection_duration="0.3s")]),
            ],
            "clusters": [_cluster("echo", echo), _cluster("echo2", echo), _cluster("dead", dead), sink_cluster,
                         _cluster("resetter", resetter), {**_cluster("blackhole", blackhole), "connect_timeout": "0.25s"}],
        },
    }


def exercise_limits(ports: dict[str, int]) -> list[Any]:
    seen: list[Any] = []
    with socket.create_connection((LOOPBACK, ports["idle"]), timeout=5) as s:
        s.sendall(b"a")
        seen.append(_recv_exactly(s, 1))
        seen.append(_recv_end(s))  # closed by the idle timeout
    for name in ("noroute", "retry"):
        with socket.create_connection((LOOPBACK, ports[name]), timeout=5) as s:
            seen.append(_recv_end(s))
    for _ in range(4):
        with socket.create_connection((LOOPBACK, ports["weighted"]), timeout=5) as s:
            s.sendall(b"w")
            seen.append(_recv_exactly(s, 1))
    with socket.create_connection((LOOPBACK, ports["rst"]), timeout=5) as s:
        s.sendall(b"x")
        # The upstream's reset is passed on. Envoy drops the "bye" that came with it (both arrive
        # in one read there); wasmproxy has sent it already: only the reset is compared.
        seen.append(_recv_end(s).split(":", 1)[0])
    with socket.create_connection((LOOPBACK, ports["timeout"]), timeout=5) as s:
        seen.append(_recv_end(s))  # closed when the upstream connect times out
    with socket.create_connection((LOOPBACK, ports["maxdur"]), timeout=5) as s:
        s.sendall(b"m")
        seen.append(_recv_exactly(s, 1))
        seen.append(_recv_end(s))  # closed at max_downstream_connection_duration
    return seen


def fill_until_paused(port: int, paused: Any) -> bool:
    """Writes to a proxy whose upstream never reads until paused() (the proxy stopped reading
    from us); False if it never paused."""
    s = socket.create_connection((LOOPBACK, port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s.setblocking(False)
    chunk = b"x" * 65536
    deadline = time.monotonic() + POLL_DEADLINE_S
    ok = False
    while time.monotonic() < deadline:
        try:
            s.send(chunk)
            continue
        except BlockingIOError:
            pass
        if paused():
            ok = True
            break
        select.select([], [s], [], 0.05)
    s.close()
    return ok


LIMIT_STATS = [
    "tcp.idle.idle_timeout", "tcp.noroute.downstream_cx_no_route", "cluster.dead.upstream_cx_connect_fail",
    "cluster.dead.upstream_cx_connect_attempts_exceeded", "tcp.weighted.downstream_cx_total",
    # A downstream that closes while the proxy is not reading from it goes unnoticed (Envoy too).
    "tcp.flow.upstream_flush_total",
    "cluster.blackhole.upstream_cx_connect_timeout", "cluster.blackhole.upstream_cx_connect_fail",
    "cluster.blackhole.upstream_cx_destroy_local", "cluster.blackhole.upstream_cx_destroy_remote",
    "cluster.blackhole.upstream_rq_cancelled", "cluster.blackhole.upstream_rq_pending_failure_eject",
    "cluster.resetter.upstream_cx_destroy_remote_with_active_rq", "tcp.maxdur.max_downstream_connection_duration",
]


def run_limits(proc_cls: type[ProxyProcess], workdir: Path, upstreams: dict[str, int]) -> dict[str, Any]:
    import yaml

    names = ("admin", "idle", "noroute", "retry", "weighted", "flow", "rst", "timeout", "maxdur")
    ports = dict(zip(names, free_ports(len(names))))
    path = workdir / f"limits_{proc_cls.__name__}.yaml"
    path.write_text(yaml.safe_dump(limits_bootstrap(ports, **upstreams)))
    with proc_cls(path) as proc:
        seen = exercise_limits(ports)

        def fetch() -> dict[str, str]:
            lines = proc.admin("/stats").body.decode().splitlines()
            return dict(line.split(": ", 1) for line in lines if ": " in line)

        seen.append(fill_until_paused(ports["flow"], lambda: fetch().get(
            "tcp.flow.downstream_flow_control_paused_reading_total", "0") != "0"))

        stats = fetch()  # every connection above has ended as the client saw it
        # Envoy creates every cluster stat up front; wasmproxy's first use creates it: unset is 0.
        picked = {name: stats.get(name, "0") for name in LIMIT_STATS}
        weighted = int(stats.get("cluster.echo.upstream_cx_total", 0)) + int(stats.get("cluster.echo2.upstream_cx_total", 0))
        return {"seen": seen, "stats": picked, "weighted_upstreams": weighted}


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    echo, sink, resetter, blackhole = TcpEcho(), Sink(), Resetter(), Blackhole()
    upstreams = {"echo": echo.port, "sink": sink.port, "dead": free_ports(1)[0], "resetter": resetter.port,
                 "blackhole": blackhole.port}
    workdir = tmp_path_factory.mktemp("tcp_limits")
    try:
        yield {"envoy": run_limits(EnvoyProcess, workdir, upstreams),
               "wasmproxy": run_limits(WasmproxyProcess, workdir, upstreams)}
    finally:
        for server in (echo, sink, resetter, blackhole):
            server.stop()


def test_tcp_proxy_limits_match_envoy(limits: dict[str, dict[str, Any]]) -> None:
    """idle_timeout, no route, max_connect_attempts, weighted_clusters, an upstream reset, a connect
    timeout, flow control (reading paused)."""
    envoy = limits["envoy"]
    assert envoy["seen"] == [b"a", "eof:b''", "eof:b''", "eof:b''", b"w", b"w", b"w", b"w", "reset", "eof:b''", b"m",
                             "eof:b''", True]
    assert envoy["stats"]["tcp.idle.idle_timeout"] == "1"
    assert envoy["stats"]["tcp.maxdur.max_downstream_connection_duration"] == "1"
    assert limits["wasmproxy"] == envoy


def test_tcp_proxy_access_log_matches_envoy(results: dict[str, dict[str, Any]]) -> None:
    envoy = results["envoy"]["access_log"]
    assert any(line.startswith("dead UF,URX 0 0 ") for line in envoy)
    assert results["wasmproxy"]["access_log"] == envoy


FLUSH_BYTES = 8 << 20


def flush_bootstrap(admin: int, port: int, sink: int) -> dict[str, Any]:
    listener = _listener("flush", port, [_tcp_proxy("flush", "sink")])
    listener["per_connection_buffer_limit_bytes"] = 64 << 20  # no flow control: the proxy reads it all
    cluster = _cluster("sink", sink)
    cluster["per_connection_buffer_limit_bytes"] = 64 << 20
    return {"admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
            "static_resources": {"listeners": [listener], "clusters": [cluster]}}


def run_reset(proc_cls: type[ProxyProcess], workdir: Path) -> list[Any]:
    """A downstream that resets while the upstream has not taken all it was sent: Envoy 1.40
    resets the upstream too (no upstream flush)."""
    import yaml

    sink = Sink()
    admin, port = free_ports(2)
    path = workdir / f"flush_{proc_cls.__name__}.yaml"
    path.write_text(yaml.safe_dump(flush_bootstrap(admin, port, sink.port)))
    try:
        with proc_cls(path) as proc:
            def stat(name: str) -> str:
                lines = proc.admin("/stats").body.decode().splitlines()
                return dict(line.split(": ", 1) for line in lines if ": " in line).get(name, "absent")

            s = socket.create_connection((LOOPBACK, port), timeout=10)
            sender = threading.Thread(target=s.sendall, args=(b"y" * FLUSH_BYTES,))
            sender.start()
            seen = [_poll(lambda: stat("tcp.flush.downstream_cx_rx_bytes_total"), lambda v: v == str(FLUSH_BYTES))]
            sender.join(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset: the proxy sees a remote close at once
            # The readiness probe's upstream connection stays (it half-closed; the sink never does).
            seen.append(_poll(lambda: (stat("cluster.sink.upstream_cx_active"), stat("tcp.flush.upstream_flush_total"),
                                       stat("cluster.sink.upstream_cx_destroy_local")), lambda v: v[0] == "1"))
            seen.append(sink.drain(1))  # conns[0] is the readiness probe's
            return seen
    finally:
        sink.stop()


def test_downstream_reset_goes_upstream_without_flush_as_envoy(tmp_path: Path) -> None:
    envoy = run_reset(EnvoyProcess, tmp_path)
    assert envoy == [str(FLUSH_BYTES), ("1", "0", "1"), "reset"]
    assert run_reset(WasmproxyProcess, tmp_path) == envoy
