"""Admin: handlers answer as Envoy 1.40's admin does; the server serves them on a dispatcher.

Expected bodies marked "Envoy 1.40" were copied from a real Envoy's admin (curl on loopback).
"""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from envoy.admin.v3 import config_dump_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2

from wasmproxy.admin import AdminHandler, AdminServer, ClusterStatus, HostStatus
from wasmproxy.event import Dispatcher
from wasmproxy.stats import StatsRegistry, Store

WAIT = 10.0
ENVOY_HEADERS = [
    ("content-type", "text/plain; charset=UTF-8"),
    ("cache-control", "no-cache, max-age=0"),
    ("x-content-type-options", "nosniff"),
]


@pytest.fixture
def registry() -> StatsRegistry:
    reg = StatsRegistry()
    store = reg.add_store(Store("main_thread"))
    store.gauge("server.live").set(1)
    store.counter("http.admin.downstream_rq_2xx").inc(3)
    return reg


def test_ready_live_and_not_live(registry: StatsRegistry) -> None:
    assert AdminHandler(registry).handle("GET", "/ready") == (200, ENVOY_HEADERS, b"LIVE\n")
    status, _, body = AdminHandler(registry, state=lambda: "DRAINING").handle("GET", "/ready")
    assert (status, body) == (503, b"DRAINING\n")


def test_server_info_has_envoys_shape(registry: StatsRegistry) -> None:
    h = AdminHandler(registry, command_line_options={"concurrency": 2, "config_path": "envoy.yaml"})
    status, headers, body = h.handle("GET", "/server_info")
    assert status == 200 and ("content-type", "application/json") in headers
    assert body.startswith(b'{\n "version": ')  # Envoy's 1-space indentation
    info = json.loads(body)
    # Envoy 1.40's top-level keys, in order.
    assert list(info) == ["version", "state", "uptime_current_epoch", "uptime_all_epochs", "hot_restart_version",
                          "command_line_options", "node", "hot_restart_initializing"]
    assert info["state"] == "LIVE" and info["uptime_current_epoch"].endswith("s")
    opts = info["command_line_options"]
    assert opts["concurrency"] == 2 and opts["config_path"] == "envoy.yaml" and opts["drain_time"] == "600s"
    # Envoy 1.40's command_line_options keys (first ones, in order).
    assert list(opts)[:8] == ["base_id", "concurrency", "config_path", "config_yaml", "allow_unknown_static_fields",
                              "admin_address_path", "local_address_ip_version", "log_level"]


def test_stats_formats_and_errors(registry: StatsRegistry) -> None:
    h = AdminHandler(registry)
    assert h.handle("GET", "/stats") == (200, ENVOY_HEADERS, b"http.admin.downstream_rq_2xx: 3\nserver.live: 1\n")
    status, headers, body = h.handle("GET", "/stats?format=json&filter=server.live")
    assert (status, body) == (200, b'{"stats":[{"name":"server.live","value":1}]}')
    assert ("content-type", "application/json") in headers
    prom = h.handle("GET", "/stats/prometheus")
    assert prom == h.handle("GET", "/stats?format=prometheus")
    assert b"# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n" in prom[2]
    # Envoy 1.40 bodies for bad requests:
    assert h.handle("GET", "/stats?format=xml") == (
        400, ENVOY_HEADERS, b"usage: /stats?format=(html|active-html|json|prometheus|text)\n\n")
    status, _, body = h.handle("GET", "/stats?filter=(")
    assert status == 400 and body.startswith(b"Invalid re2 regex: ")
    assert h.handle("GET", "/stats?usedonly&filter=rq_")[2] == b"http.admin.downstream_rq_2xx: 3\n"
    # A "+" in a regex is a regex "+", not a space; %-escapes are decoded.
    assert h.handle("GET", "/stats?filter=^http\\..+_2xx$")[2] == b"http.admin.downstream_rq_2xx: 3\n"
    assert h.handle("GET", "/stats?filter=server%2Elive")[2] == b"server.live: 1\n"
    assert h.handle("GET", "/stats?type=Bogus") == (400, ENVOY_HEADERS, b"invalid &type= param")
    assert h.handle("GET", "/stats?type=Gauges") == (200, ENVOY_HEADERS, b"server.live: 1\n")
    assert h.handle("GET", "/stats/prometheus?type=Counters") == prom  # Envoy ignores type= here


def test_flush_on_admin_merges_histograms(registry: StatsRegistry) -> None:
    registry._all_stores()[0].histogram("server.initialization_time_ms").record(10)
    lazy = AdminHandler(registry).handle("GET", "/stats?filter=initialization")[2]
    assert lazy == b"server.initialization_time_ms: No recorded values\n"
    eager = AdminHandler(registry, flush_on_admin=True).handle("GET", "/stats?filter=initialization")[2]
    assert eager.startswith(b"server.initialization_time_ms: P0(10.5,10.5) ")


# Envoy 1.40 /clusters for a STATIC cluster "backend.svc" with one endpoint 127.0.0.1:1.
ENVOY_CLUSTERS_TEXT = """\
backend.svc::observability_name::backend.svc
backend.svc::default_priority::max_connections::1024
backend.svc::default_priority::max_pending_requests::1024
backend.svc::default_priority::max_requests::1024
backend.svc::default_priority::max_retries::3
backend.svc::high_priority::max_connections::1024
backend.svc::high_priority::max_pending_requests::1024
backend.svc::high_priority::max_requests::1024
backend.svc::high_priority::max_retries::3
backend.svc::added_via_api::false
backend.svc::127.0.0.1:1::cx_active::0
backend.svc::127.0.0.1:1::cx_connect_fail::0
backend.svc::127.0.0.1:1::cx_total::0
backend.svc::127.0.0.1:1::rq_active::0
backend.svc::127.0.0.1:1::rq_error::0
backend.svc::127.0.0.1:1::rq_pending_active::0
backend.svc::127.0.0.1:1::rq_success::0
backend.svc::127.0.0.1:1::rq_timeout::0
backend.svc::127.0.0.1:1::rq_total::0
backend.svc::127.0.0.1:1::hostname::
backend.svc::127.0.0.1:1::health_flags::healthy
backend.svc::127.0.0.1:1::weight::1
backend.svc::127.0.0.1:1::region::
backend.svc::127.0.0.1:1::zone::
backend.svc::127.0.0.1:1::sub_zone::
backend.svc::127.0.0.1:1::canary::false
backend.svc::127.0.0.1:1::priority::0
backend.svc::127.0.0.1:1::success_rate::-1
backend.svc::127.0.0.1:1::local_origin_success_rate::-1
"""


def test_clusters_text_and_json_match_envoy(registry: StatsRegistry) -> None:
    clusters = [ClusterStatus("backend.svc", [HostStatus("127.0.0.1:1")]), ClusterStatus("other")]
    h = AdminHandler(registry, clusters=lambda: clusters)
    assert h.handle("GET", "/clusters?filter=backend") == (200, ENVOY_HEADERS, ENVOY_CLUSTERS_TEXT.encode())
    doc = json.loads(h.handle("GET", "/clusters?format=json&filter=^backend")[2])
    status = doc["cluster_statuses"][0]
    # Envoy 1.40 JSON: zero-valued stats omit "value"; counters first, gauges typed.
    assert status["host_statuses"][0]["stats"][0] == {"name": "cx_connect_fail"}
    assert status["host_statuses"][0]["stats"][6] == {"type": "GAUGE", "name": "cx_active"}
    assert status["host_statuses"][0]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 1}}
    assert status["circuit_breakers"]["thresholds"][1] == {
        "priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024,
        "max_retries": 3}
    assert status["host_statuses"][0]["locality"] == {}
    assert len(doc["cluster_statuses"]) == 1
    assert h.handle("GET", "/clusters?filter=(") == (400, ENVOY_HEADERS, b"Invalid re2 regex")


def test_config_dump_from_proto_and_dict(registry: StatsRegistry) -> None:
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "n1"
    dump = config_dump_pb2.ConfigDump()
    dump.configs.add().Pack(config_dump_pb2.BootstrapConfigDump(bootstrap=bootstrap))
    status, headers, body = AdminHandler(registry, config_dump=lambda: dump).handle("GET", "/config_dump")
    assert status == 200 and ("content-type", "application/json") in headers
    doc = json.loads(body)
    assert doc["configs"][0]["@type"] == "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"
    assert doc["configs"][0]["bootstrap"]["node"]["id"] == "n1"
    body = AdminHandler(registry, config_dump=lambda: {"configs": [{"x": 1}]}).handle("GET", "/config_dump")[2]
    assert json.loads(body) == {"configs": [{"x": 1}]}


def test_quitquitquit_is_post_only(registry: StatsRegistry) -> None:
    calls = []
    h = AdminHandler(registry, shutdown=lambda: calls.append(1))
    # Envoy 1.40: GET /quitquitquit
    assert h.handle("GET", "/quitquitquit") == (405, ENVOY_HEADERS, b"Method GET not allowed, POST required.")
    assert calls == []
    assert h.handle("POST", "/quitquitquit") == (200, ENVOY_HEADERS, b"OK\n")
    assert calls == [1]


def test_unknown_path_lists_commands_like_envoy(registry: StatsRegistry) -> None:
    status, headers, body = AdminHandler(registry).handle("GET", "/nonexistent")
    assert status == 404 and headers == ENVOY_HEADERS
    text = body.decode()
    assert text.startswith("invalid path. admin commands are:\n")
    lines = text.splitlines()
    # These lines are verbatim in Envoy 1.40's list.
    for line in [
        "  /clusters: upstream cluster status",
        "      filter: Regular expression (Google re2) for filtering clusters by name",
        "  /quitquitquit (POST): exit the server",
        "  /ready: print server state, return 200 if LIVE, otherwise return 503",
        "  /server_info: print server version/status information",
        "  /stats: print server stats",
        "      usedonly: Only include stats that have been written by system since restart",
        "  /stats/prometheus: print server stats in prometheus format",
    ]:
        assert line in lines
    assert AdminHandler(registry).handle("GET", "/help")[2].startswith(b"admin commands are:\n  /clusters")


def test_admin_server_serves_on_dispatcher_loop(registry: StatsRegistry, tmp_path) -> None:
    d = Dispatcher("main_thread")
    quit_called = threading.Event()
    handler = AdminHandler(registry, shutdown=quit_called.set)
    server = AdminServer(handler, d, "127.0.0.1", 0, address_path=str(tmp_path / "admin.addr"))
    started = threading.Event()
    errors: list[BaseException] = []

    def start() -> None:
        task = d.loop.create_task(server.start())
        task.add_done_callback(lambda t: (t.exception() and errors.append(t.exception()), started.set()))

    d.post(start)
    t = threading.Thread(target=d.run)
    t.start()
    try:
        assert started.wait(WAIT) and not errors
        host, port = server.address
        assert (tmp_path / "admin.addr").read_text() == f"{host}:{port}"
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
        conn.request("GET", "/ready")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"LIVE\n")
        assert r.getheader("server") == "envoy" and r.getheader("x-content-type-options") == "nosniff"
        conn.request("GET", "/stats?format=json&filter=server.live")  # same connection: keep-alive
        r = conn.getresponse()
        assert json.loads(r.read()) == {"stats": [{"name": "server.live", "value": 1}]}
        conn.request("POST", "/quitquitquit")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"OK\n")
        assert quit_called.is_set()
        conn.close()
    finally:
        closed = threading.Event()
        d.post(lambda: (server.close(), closed.set()))
        assert closed.wait(WAIT)
        d.exit()
        t.join(WAIT)
        d.close()
    assert not t.is_alive()


class _FakeServer:
    """The AdminHost shape: what start_admin reads from the Server."""

    def __init__(self, dispatcher: Dispatcher, stats: StatsRegistry) -> None:
        self.bootstrap = bootstrap_pb2.Bootstrap()
        self.bootstrap.admin.address.socket_address.address = "127.0.0.1"
        self.bootstrap.node.id = "node-1"
        self.bootstrap.static_resources.clusters.add(name="backend")
        self.bootstrap.stats_flush_on_admin = True
        self.opts = type("Opts", (), {"concurrency": 2, "mode": "serve", "config_path": "envoy.yaml"})()
        self.stats = stats
        self.main_dispatcher = dispatcher
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_start_admin_wires_server_state(registry: StatsRegistry) -> None:
    from wasmproxy.admin import start_admin

    d = Dispatcher("main_thread")
    server = _FakeServer(d, registry)
    box: list[AdminServer] = []
    ready = threading.Event()

    def init() -> None:
        admin = start_admin(server)
        box.append(admin)
        d.loop.call_soon(ready.set)  # the start task has run by the next iteration or two

    d.post(init)
    t = threading.Thread(target=d.run)
    t.start()
    try:
        assert ready.wait(WAIT)
        host, port = box[0].address
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
        conn.request("GET", "/server_info")
        info = json.loads(conn.getresponse().read())
        assert info["command_line_options"]["concurrency"] == 2
        assert info["command_line_options"]["mode"] == "Serve"
        assert info["node"]["id"] == "node-1"
        conn.request("GET", "/config_dump")
        dump = json.loads(conn.getresponse().read())
        types = [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]]
        assert types == ["BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump"]
        assert dump["configs"][1]["static_clusters"][0]["cluster"]["name"] == "backend"
        conn.request("POST", "/quitquitquit")
        assert conn.getresponse().read() == b"OK\n"
        assert server.shutdowns == 1
        conn.close()
    finally:
        closed = threading.Event()
        d.post(lambda: (box and box[0].close(), closed.set()))
        assert closed.wait(WAIT)
        d.exit()
        t.join(WAIT)
        d.close()


def test_admin_bind_failure_raises_at_once(registry: StatsRegistry) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    d = Dispatcher("main_thread")
    try:
        with pytest.raises(OSError):
            AdminServer(AdminHandler(registry), d, "127.0.0.1", taken.getsockname()[1]).bind()
    finally:
        taken.close()
        d.close()


def test_clusters_from_the_real_cluster_manager_match_envoy(tmp_path) -> None:
    """The same STATIC cluster Envoy 1.40 printed ENVOY_CLUSTERS_TEXT for, through our ClusterManager."""
    from wasmproxy.admin.start import _cluster_statuses
    from wasmproxy.config import load_bootstrap
    from wasmproxy.thread_local import ThreadLocalInstance
    from wasmproxy.upstream.cluster_manager import ClusterManager

    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(
        "static_resources:\n"
        "  clusters:\n"
        "  - name: backend.svc\n"
        "    type: STATIC\n"
        "    load_assignment:\n"
        "      cluster_name: backend.svc\n"
        "      endpoints:\n"
        "      - lb_endpoints:\n"
        "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}\n"
    )
    d = Dispatcher("main_thread")
    d.thread_id = threading.get_ident()  # used on this thread as main, loop not run
    try:
        cm = ClusterManager.from_bootstrap(load_bootstrap(str(cfg)), d, ThreadLocalInstance(d), Store())
        handler = AdminHandler(StatsRegistry(), clusters=lambda: _cluster_statuses(cm))
        assert handler.handle("GET", "/clusters")[2] == ENVOY_CLUSTERS_TEXT.encode()
    finally:
        d.close()


def test_logging_changes_levels_like_envoy(registry: StatsRegistry) -> None:
    from wasmproxy import log

    h = AdminHandler(registry)
    try:
        assert h.handle("GET", "/logging")[:2] == (405, ENVOY_HEADERS)
        status, _, body = h.handle("POST", "/logging?level=debug")
        text = body.decode()
        # Envoy 1.40: the list starts with its registry order and ends with a blank line.
        assert status == 200 and text.startswith("active loggers:\n  a2a: debug\n  admin: debug\n")
        assert text.endswith("\n\n")
        text = h.handle("POST", "/logging?paths=wasm:trace,http:info")[2].decode()
        assert "  wasm: trace\n" in text and "  http: info\n" in text and "  main: debug\n" in text
        assert log.get_logger("wasm").isEnabledFor(log.TRACE)
        text = h.handle("POST", "/logging?router=error")[2].decode()
        assert "  router: error\n" in text
        status, _, body = h.handle("POST", "/logging?level=loud")
        assert status == 400
        assert body.startswith(b"error: unknown logger level\n\nusage: /logging?<name>=<level> (change single level)\n")
        assert b"levels: trace debug info warning error critical off \nactive loggers:\n" in body
        status, _, body = h.handle("POST", "/logging?paths=nope:trace")
        assert status == 400 and body.startswith(b"error: unknown logger name\n\n")
    finally:
        log.set_log_level("info")


def test_listeners_text_and_json(registry: StatsRegistry) -> None:
    h = AdminHandler(registry, listeners=lambda: [("l0", "127.0.0.1", 43505), ("v6", "::1", 80)])
    # Envoy 1.40: /listeners printed "l0::127.0.0.1:43505".
    assert h.handle("GET", "/listeners") == (200, ENVOY_HEADERS, b"l0::127.0.0.1:43505\nv6::[::1]:80\n")
    doc = json.loads(h.handle("GET", "/listeners?format=json")[2])
    assert doc["listener_statuses"][0] == {
        "name": "l0", "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 43505}}}


def test_logging_parameter_errors_and_plain_listing(registry: StatsRegistry) -> None:
    h = AdminHandler(registry)
    status, _, body = h.handle("POST", "/logging")
    assert status == 200 and body.startswith(b"active loggers:\n")
    status, _, body = h.handle("POST", "/logging?level=info&paths=wasm:debug")
    assert status == 400 and body.startswith(b"error: invalid number of parameters\n\n")


def test_prometheus_filter_errors_and_flush_on_admin(registry: StatsRegistry) -> None:
    registry._all_stores()[0].histogram("h_ms").record(3)
    status, _, body = AdminHandler(registry).handle("GET", "/stats/prometheus?filter=(")
    assert status == 400 and body.startswith(b"Invalid re2 regex: ")
    body = AdminHandler(registry, flush_on_admin=True).handle("GET", "/stats/prometheus?filter=h_ms")[2]
    assert b"envoy_h_ms_count{} 1\n" in body


def test_clusters_json_success_rates(registry: StatsRegistry) -> None:
    host = HostStatus("10.0.0.1:80", success_rate=99.5, local_origin_success_rate=100)
    h = AdminHandler(registry, clusters=lambda: [ClusterStatus("c", [host])])
    status = json.loads(h.handle("GET", "/clusters?format=json")[2])["cluster_statuses"][0]["host_statuses"][0]
    assert status["success_rate"] == {"value": 99.5}
    assert status["local_origin_success_rate"] == {"value": 100.0}
    assert b"c::10.0.0.1:80::success_rate::99.5\n" in h.handle("GET", "/clusters")[2]


def _raw_exchange(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):  # the server closes: bounded by the response size
            chunks.append(chunk)
    return b"".join(chunks)


def test_admin_server_close_errors_and_handler_failure(registry: StatsRegistry) -> None:
    d = Dispatcher("main_thread")

    def broken() -> list[ClusterStatus]:
        raise RuntimeError("provider bug")

    server = AdminServer(AdminHandler(registry, clusters=broken), d)
    port = server.bind()[1]
    started = threading.Event()
    d.post(lambda: d.loop.create_task(server.start()).add_done_callback(lambda t: started.set()))
    t = threading.Thread(target=d.run)
    t.start()
    try:
        assert started.wait(WAIT)
        reply = _raw_exchange(port, b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nconnection: close\r\n" in reply
        assert reply.endswith(b"\r\n\r\nLIVE\n")
        reply = _raw_exchange(port, b"GET /clusters HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        reply = _raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    finally:
        closed = threading.Event()
        d.post(lambda: (server.close(), closed.set()))
        assert closed.wait(WAIT)
        d.exit()
        t.join(WAIT)
        d.close()
    unstarted = AdminServer(AdminHandler(registry), d)
    unstarted.bind()
    unstarted.close()  # a bound but never started server releases its socket


def test_histogram_buckets_parameter(registry: StatsRegistry) -> None:
    h = AdminHandler(registry)
    usage = b"usage: /stats?histogram_buckets=(cumulative|disjoint|detailed|summary|prometheusnative)\n"
    # Envoy 1.40 bodies:
    assert h.handle("GET", "/stats?histogram_buckets=bogus") == (400, ENVOY_HEADERS, usage)
    assert h.handle("GET", "/stats/prometheus?histogram_buckets=bogus") == (400, ENVOY_HEADERS, usage)
    assert h.handle("GET", "/stats/prometheus?histogram_buckets=detailed") == (
        400, ENVOY_HEADERS, b"unsupported prometheus histogram bucket mode")
    assert h.handle("GET", "/stats?histogram_buckets=cumulative")[0] == 200
    assert h.handle("GET", "/stats?format=prometheus&histogram_buckets=summary")[0] == 200
