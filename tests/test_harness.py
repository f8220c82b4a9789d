"""Self-tests of the differential harness (tests/support) and of the echo upstream it drives."""

from __future__ import annotations

import hashlib
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.cases import (TWIN, Case, CaseFile, DiffEnvironment, RequestSpec, Result, check_case, expectation_failures,
                           selected_targets)
from support.compare import MISSING, first_difference, format_difference
from support.config import bootstrap, render_template, substitute, write_yaml
from support.normalize import Normaliser
from support.ports import LOOPBACK, can_connect, free_port, free_ports
from support.processes import ENVOY_BIN, EnvoyProcess, ProcessError
from support.raw_http import PeerClosed, RawConnection, Response, build_request
from wasmproxy.demo.upstream import pattern_bytes, start_in_thread


@pytest.fixture
def echo(echo_upstream: int) -> Iterator[RawConnection]:
    with RawConnection(LOOPBACK, echo_upstream, timeout=5) as conn:
        yield conn


def _resp(headers: list[tuple[str, str]], body: bytes = b"", status: int = 200) -> Response:
    return Response(status, "OK", "HTTP/1.1", headers, body)


# --- raw client against the echo upstream -------------------------------------------------------

def test_echo_reports_what_it_received(echo: RawConnection) -> None:
    resp = echo.request("POST", "/p?q=1", [("X-Mixed-Case", "v"), ("x-dup", "1"), ("x-dup", "2")], b"hello")
    doc = resp.json()
    assert resp.status == 200 and resp.header("content-type") == "application/json"
    assert doc["method"] == "POST" and doc["path"] == "/p?q=1"
    assert doc["headers"] == [["host", "diff.test"], ["X-Mixed-Case", "v"], ["x-dup", "1"], ["x-dup", "2"],
                              ["content-length", "5"]]
    assert doc["body"] == "hello" and doc["body_length"] == 5
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


def test_keep_alive_reuses_one_connection(echo: RawConnection) -> None:
    sock = echo.sock
    for i in range(5):
        assert echo.request("GET", f"/n{i}").json()["path"] == f"/n{i}"
    assert echo.sock is sock and not echo.closed_by_peer(timeout=0.05)


def test_pipelined_requests_answered_in_order(echo: RawConnection) -> None:
    echo.send(b"".join(build_request("GET", f"/pipe{i}") for i in range(3)))
    assert [echo.read_response().json()["path"] for _ in range(3)] == ["/pipe0", "/pipe1", "/pipe2"]


def test_chunked_request_body_and_trailers(echo: RawConnection) -> None:
    echo.send(b"POST /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n")
    doc = echo.read_response().json()
    assert doc["body"] == "abcde" and doc["trailers"] == [["x-trailer", "t"]]


def test_chunked_response_with_trailers(echo: RawConnection) -> None:
    resp = echo.request("GET", "/", [("x-echo-body-size", "200000"), ("x-echo-trailers", "a:1,b:2")])
    assert resp.chunked and resp.header("content-length") is None
    assert resp.body == pattern_bytes(0, 200000)
    assert resp.trailers == [("a", "1"), ("b", "2")]


def test_status_headers_and_no_body_statuses(echo: RawConnection) -> None:
    resp = echo.request("GET", "/", [("x-echo-status", "418"), ("x-echo-headers", "x-a:1, x-b : two")])
    assert (resp.status, resp.header("x-a"), resp.header("x-b")) == (418, "1", "two")
    no_content = echo.request("GET", "/", [("x-echo-status", "204")])
    assert no_content.status == 204 and no_content.body == b"" and no_content.header("content-length") is None
    head = echo.request("HEAD", "/", [("x-echo-body-size", "1000")])
    assert head.header("content-length") == "1000" and head.body == b""
    assert echo.request("GET", "/after").json()["path"] == "/after"


def test_large_streamed_response_body(echo: RawConnection) -> None:
    size = 5 * 1024 * 1024
    resp = echo.request("GET", "/", [("x-echo-body-size", str(size))])
    assert len(resp.body) == size and resp.body_sha256 == hashlib.sha256(pattern_bytes(0, size)).hexdigest()


def test_expect_100_continue(echo: RawConnection) -> None:
    head = build_request("POST", "/e", [("expect", "100-continue")], b"later")
    split = head.index(b"\r\n\r\n") + 4
    echo.send(head[:split])
    interim = echo.read_response("POST", stop_at_interim=True)
    assert interim.status == 100
    echo.send(head[split:])
    assert echo.read_response("POST").json()["body"] == "later"


def test_interim_responses(echo: RawConnection) -> None:
    resp = echo.request("GET", "/", [("x-echo-interim", "103,100")])
    assert resp.status == 200 and [s for s, _ in resp.interim] == [103, 100]


def test_close_is_detected(echo: RawConnection) -> None:
    resp = echo.request("GET", "/", [("x-echo-close", "1")])
    assert resp.header("connection") == "close"
    assert echo.closed_by_peer(timeout=5)


def test_reset_before_headers_is_peer_closed_without_response(echo: RawConnection) -> None:
    with pytest.raises(PeerClosed) as info:
        echo.request("GET", "/", [("x-echo-reset", "before-headers")])
    assert info.value.partial is None and info.value.received == b""


def test_reset_after_headers_gives_a_truncated_response(echo: RawConnection) -> None:
    with pytest.raises(PeerClosed) as info:
        echo.request("GET", "/", [("x-echo-reset", "after-headers")])
    partial = info.value.partial
    assert partial is not None and partial.status == 200 and not partial.complete


def test_delay_is_a_timer_not_a_blocked_loop(echo_upstream: int) -> None:
    with RawConnection(LOOPBACK, echo_upstream, timeout=5) as slow, \
            RawConnection(LOOPBACK, echo_upstream, timeout=5) as fast:
        slow.send(build_request("GET", "/slow", [("x-echo-delay-ms", "1500")]))
        assert fast.request("GET", "/fast").status == 200
        # Had the delay blocked the server's loop, the slow answer would have been written first.
        assert select.select([slow.sock], [], [], 0)[0] == []
        assert slow.read_response().json()["path"] == "/slow"


def test_malformed_request_gets_400_and_close(echo: RawConnection) -> None:
    echo.send(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
    assert echo.read_response().status == 400
    assert echo.closed_by_peer(timeout=5)


def test_malformed_control_header_gets_400(echo: RawConnection) -> None:
    assert echo.request("GET", "/", [("x-echo-status", "abc")]).status == 400
    assert echo.closed_by_peer(timeout=5)


def test_read_timeout_is_bounded(echo: RawConnection) -> None:
    echo.send(build_request("GET", "/", [("x-echo-delay-ms", "2000")]))
    with pytest.raises(TimeoutError):
        echo.read_response(timeout=0.2)


def test_start_in_thread_and_stop() -> None:
    server, port = start_in_thread(LOOPBACK, 0)
    try:
        conn = RawConnection(LOOPBACK, port, timeout=5)
        assert conn.request("GET", "/").status == 200
    finally:
        server.stop()
    assert conn.closed_by_peer(timeout=5)
    conn.close()
    assert not can_connect(port)


def test_module_runs_as_a_command() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wasmproxy.demo.upstream", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout is not None
        assert f"listening on 127.0.0.1:{port}" in proc.stdout.readline()
        with RawConnection(LOOPBACK, port, timeout=5) as conn:
            assert conn.request("GET", "/cli").json()["path"] == "/cli"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- normaliser -----------------------------------------------------------------------------------

def test_normaliser_hides_only_volatile_values() -> None:
    norm = Normaliser({41234: "listener_port"})
    resp = _resp([("date", "Fri, 27 Nov 2026 07:00:00 GMT"), ("server", "envoy"),
                  ("x-envoy-upstream-service-time", "3"), ("location", "http://127.0.0.1:41234/x"),
                  ("x-other", "127.0.0.1:5555")])
    headers = norm(resp)["headers"]
    assert headers == {"date": ["<date>"], "location": ["http://127.0.0.1:<listener_port>/x"],
                       "server": ["<server>"], "x-envoy-upstream-service-time": ["<ms>"],
                       "x-other": ["127.0.0.1:5555"]}


def test_normaliser_ignore_lists() -> None:
    headers = Normaliser(ignore_headers=["X-Skip"])(_resp([("x-skip", "1"), ("x-keep", "2")]))["headers"]
    assert headers == {"x-keep": ["2"]}


def test_normaliser_keeps_malformed_volatile_values() -> None:
    headers = Normaliser()(_resp([("date", "yesterday"), ("x-envoy-upstream-service-time", "3ms")]))["headers"]
    assert headers == {"date": ["yesterday"], "x-envoy-upstream-service-time": ["3ms"]}


def test_normaliser_keeps_presence_and_real_differences() -> None:
    norm = Normaliser()
    with_date = norm(_resp([("date", "Fri, 27 Nov 2026 07:00:00 GMT"), ("x-a", "1")]))
    without = norm(_resp([("x-a", "2")]))
    d = first_difference(with_date, without)
    assert d is not None and d.field == "headers['date']" and d.right == MISSING
    assert first_difference(norm(_resp([("x-a", "1")])), without) is not None


def _echo_resp(echoed: str, response_headers: list[tuple[str, str]] | None = None) -> Response:
    body = ('{"method": "GET", "path": "/", "http_version": "1.1", "headers": %s, "body_length": 0,'
            ' "body_sha256": "e3b0", "body": "", "trailers": []}' % echoed).encode()
    return _resp([("content-type", "application/json"), *(response_headers or [])], body)


def test_normaliser_echo_body() -> None:
    resp = _echo_resp('[["host", "127.0.0.1:40000"], ["x-request-id", "9d1c"], ["x-forwarded-for", "127.0.0.1"],'
                      ' ["x-b", "2"], ["x-a", "1"]]')
    echoed = Normaliser({40000: "listener_port"})(resp)["body"]["headers"]
    assert echoed == {"host": ["127.0.0.1:<listener_port>"], "x-a": ["1"], "x-b": ["2"],
                      "x-forwarded-for": ["127.0.0.1"], "x-request-id": ["<request-id-1>"]}
    ordered = Normaliser(ordered_headers=True, ignore_echo_headers=["host"])(resp)["body"]["headers"]
    assert ordered == ["x-request-id: <request-id-1>", "x-forwarded-for: 127.0.0.1", "x-b: 2", "x-a: 1"]


def test_generated_ids_keep_their_relations() -> None:
    norm = Normaliser()
    same = norm(_echo_resp('[["x-request-id", "aaa"]]', [("x-request-id", "aaa")]))
    other = norm(_echo_resp('[["x-request-id", "bbb"]]', [("x-request-id", "ccc")]))
    assert same["headers"]["x-request-id"] == same["body"]["headers"]["x-request-id"] == ["<request-id-1>"]
    assert other["body"]["headers"]["x-request-id"] == ["<request-id-1>"]
    assert other["headers"]["x-request-id"] == ["<request-id-2>"]
    preserved = norm(_echo_resp('[["x-request-id", "mine"]]'), sent=["mine"])
    regenerated = norm(_echo_resp('[["x-request-id", "fresh"]]'), sent=["mine"])
    assert preserved["body"]["headers"]["x-request-id"] == ["mine"]
    assert first_difference(preserved, regenerated) is not None


def test_normaliser_large_bodies_by_digest_and_closed_outcomes() -> None:
    big = _resp([], b"x" * 10000)
    assert Normaliser()(big)["body"] == {"length": 10000, "sha256": hashlib.sha256(b"x" * 10000).hexdigest()}
    assert Normaliser()(PeerClosed(b""))["outcome"] == "closed before a response"
    assert Normaliser()(TimeoutError())["outcome"] == "no response before the deadline"


# --- comparison and case checking -------------------------------------------------------------

def test_first_difference_walks_in_order() -> None:
    assert first_difference({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}) is None
    assert first_difference({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3]}).field == "b[1]"  # type: ignore[union-attr]
    d = first_difference({"b": [1]}, {"b": [1, 2]})
    assert d is not None and (d.field, d.left, d.right) == ("b[1]", MISSING, 2)
    assert first_difference({"status": 1}, {"status": True}) is not None


def test_format_difference_names_case_request_field_and_values() -> None:
    d = first_difference({"status": 504}, {"status": 503})
    assert d is not None
    msg = format_difference("route_timeout", 2, "GET /slow", d)
    assert "case 'route_timeout', request #2 (GET /slow): first difference at status" in msg
    assert "envoy:     504" in msg and "wasmproxy: 503" in msg


def test_check_case_reports_first_difference_between_targets() -> None:
    case = Case("c", [RequestSpec(path="/a"), RequestSpec(path="/b")])
    same = _resp([("x-a", "1")])
    results = {"envoy": [Result(same, None), Result(same, None)],
               "wasmproxy": [Result(same, None), Result(_resp([("x-a", "2")]), None)]}
    norms = {"envoy": Normaliser(), "wasmproxy": Normaliser()}
    with pytest.raises(AssertionError, match=r"request #2 \(GET /b\): first difference at headers\['x-a'\]"):
        check_case(case, results, norms)
    results["wasmproxy"][1] = Result(same, None)
    check_case(case, results, norms)
    case.ignore_fields.append("headers")
    results["wasmproxy"][1] = Result(_resp([("x-a", "2")]), None)
    check_case(case, results, norms)


def test_expectations_are_checked() -> None:
    spec = RequestSpec.from_dict({"path": "/", "expect": {"status": 200, "closed": True, "headers": {"x-a": None},
                                                           "echo": {"path": "/x"}}})
    resp = _resp([("x-a", "1"), ("content-type", "application/json")],
                 b'{"method": "GET", "path": "/y", "headers": [], "body_sha256": ""}', status=404)
    fails = expectation_failures(spec, Result(resp, False))
    assert len(fails) == 4, fails
    assert expectation_failures(RequestSpec.from_dict({"expect": {"status": 200}}), Result(PeerClosed(b""), True))


def test_case_file_format_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: {template: x}\ncases: [{name: a, requests: [{pth: /}]}]\n")
    with pytest.raises(ValueError, match="unknown request fields"):
        CaseFile.load(bad)
    bad.write_text("config: {template: x}\ncases: [{name: a, requests: []}, {name: a, requests: []}]\n")
    with pytest.raises(ValueError, match="duplicate case names"):
        CaseFile.load(bad)


def test_selected_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WASMPROXY_DIFF_REFERENCE_ONLY", raising=False)
    monkeypatch.delenv("WASMPROXY_DIFF_TARGETS", raising=False)
    assert selected_targets() == ["envoy", "wasmproxy"]
    monkeypatch.setenv("WASMPROXY_DIFF_TARGETS", "wasmproxy")
    assert selected_targets() == ["wasmproxy"]
    monkeypatch.setenv("WASMPROXY_DIFF_REFERENCE_ONLY", "1")
    assert selected_targets() == ["envoy"]


# --- config rendering and processes ---------------------------------------------------------------

def test_free_ports_are_distinct() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_substitute_keeps_lone_placeholder_types() -> None:
    doc = substitute({"port_value": "${p}", "name": "svc-${p}", "list": ["${p}"]}, {"p": 8080})
    assert doc == {"port_value": 8080, "name": "svc-8080", "list": [8080]}
    assert render_template("a: ${x}\nb: {c: 1}\nr: ^/a$\n", {"x": 2}) == "a: 2\nb: {c: 1}\nr: ^/a$\n"
    with pytest.raises(KeyError):
        render_template("${missing}", {})


def test_case_file_renders_bootstrap_for_each_target(tmp_path: Path) -> None:
    case_file = tmp_path / "c.yaml"
    case_file.write_text(textwrap.dedent("""
        config:
          bootstrap:
            clusters: {echo: "${echo_port}"}
            virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: echo}}]}]
        cases: []
    """))
    doc = yaml.safe_load(CaseFile.load(case_file).render({"listener_port": 1, "admin_port": 2, "echo_port": 3}))
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 1}
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 2
    endpoint = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 3
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"


@pytest.mark.envoy
def test_rendered_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    doc = bootstrap(listener_port=free_port(), admin_port=free_port(), clusters={"echo": 1},
                    http_filters=[{"name": "envoy.filters.http.buffer", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                        "max_request_bytes": 1024}}],
                    virtual_hosts=[{"name": "v", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}])
    path = write_yaml(doc, tmp_path / "b.yaml")
    out = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "-l", "error"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.envoy
def test_envoy_process_failure_shows_its_log(tmp_path: Path) -> None:
    doc = bootstrap(listener_port=free_port(), admin_port=free_port(), clusters={},
                    virtual_hosts=[{"name": "v", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nowhere"}}]}])
    path = write_yaml(doc, tmp_path / "bad.yaml")
    proc = EnvoyProcess(path)
    with pytest.raises(ProcessError, match=r"(?s)exited with 1 during startup.*nowhere"):
        proc.start()
    assert not proc.running


@pytest.mark.envoy
def test_envoy_process_serves_and_stops(tmp_path: Path, echo_upstream: int) -> None:
    listener = free_port()
    doc = bootstrap(listener_port=listener, admin_port=free_port(), clusters={"echo": echo_upstream},
                    virtual_hosts=[{"name": "v", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}])
    with EnvoyProcess(write_yaml(doc, tmp_path / "ok.yaml")) as envoy:
        with RawConnection(LOOPBACK, listener) as conn:
            assert conn.request("GET", "/via-envoy").json()["path"] == "/via-envoy"
        assert envoy.rss_kib() > 0
        assert envoy.admin("/ready").body == b"LIVE\n"
    assert not envoy.running and envoy.proc is not None and envoy.proc.returncode == 0


@pytest.mark.envoy
def test_envoy_against_itself_shows_no_difference(tmp_path: Path, echo_upstream: int) -> None:
    """Two Envoys on one config must compare equal: normalisation hides all that is volatile."""
    case_file = CaseFile.load(Path(__file__).parent / "diff_cases" / "http_data_path.yaml")
    picked = {"path_match", "prefix_rewrite", "route_timeout", "malformed_header_line", "pipelining"}
    env = DiffEnvironment(case_file, tmp_path, echo_upstream, free_port(), targets=["envoy", TWIN]).start()
    try:
        for case in case_file.cases:
            if case.name in picked:
                env.run(case)
    finally:
        env.stop()


@pytest.mark.envoy
def test_template_with_extra_ports(tmp_path: Path, echo_upstream: int) -> None:
    """`ports:` gives each target more free ports; readiness waits for every listener."""
    template = tmp_path / "two.yaml"
    doc = bootstrap(listener_port=0, admin_port=0, clusters={"echo": 0},
                    virtual_hosts=[{"name": "v", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}])
    listeners = doc["static_resources"]["listeners"]
    listeners.append(yaml.safe_load(yaml.safe_dump(listeners[0])) | {"name": "second"})
    listeners[0]["address"]["socket_address"]["port_value"] = "${listener_port}"
    listeners[1]["address"]["socket_address"]["port_value"] = "${second_port}"
    doc["admin"]["address"]["socket_address"]["port_value"] = "${admin_port}"
    cluster = doc["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] = "${echo_port}"
    write_yaml(yaml.safe_dump(doc).replace("'${", "${").replace("}'", "}"), template)
    case_file = tmp_path / "cases.yaml"
    case_file.write_text("config: {template: two.yaml, ports: [second_port]}\ncases: []\n")
    with DiffEnvironment(CaseFile.load(case_file), tmp_path, echo_upstream, free_port(), ["envoy"]) as env:
        target = env.targets["envoy"]
        second = next(p for p, name in target.port_names.items() if name == "second_port")
        for port in (target.port, second):
            with RawConnection(LOOPBACK, port) as conn:
                assert conn.request("GET", f"/on-{port}").json()["path"] == f"/on-{port}"


@pytest.mark.envoy
def test_show_prints_normalised_outcomes(capsys: pytest.CaptureFixture[str]) -> None:
    from support import show

    assert show.main([str(Path(__file__).parent / "diff_cases" / "front_proxy.yaml"), "--case", "no_route"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["no_route#1 envoy", "no_route#2 envoy"]
    assert '"status": 404' in lines[0]


@pytest.mark.envoy
def test_port_taken_before_bind_is_retried(tmp_path: Path, echo_upstream: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import support.cases

    squatter = socket.socket()
    squatter.bind((LOOPBACK, 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    calls: list[int] = []

    def ports_with_a_taken_first(n: int) -> list[int]:
        calls.append(n)
        fresh = free_ports(n)
        return [taken, *fresh[1:]] if len(calls) == 1 else fresh

    monkeypatch.setattr(support.cases, "free_ports", ports_with_a_taken_first)
    case_file = CaseFile.load(Path(__file__).parent / "diff_cases" / "front_proxy.yaml")
    try:
        with DiffEnvironment(case_file, tmp_path, echo_upstream, free_port(), ["envoy"]) as env:
            assert len(calls) == 2 and env.targets["envoy"].port != taken
            with RawConnection(LOOPBACK, env.targets["envoy"].port) as conn:
                assert conn.request("GET", "/service/1").status == 200
    finally:
        squatter.close()
