"""Wasm gRPC callouts, differential: the grpc_callout plugin in real Envoy 1.40 and in wasmproxy,
on the same bootstrap, each with its own loopback gRPC server (tests/wasm_grpc_support.py).

Every case pins what Envoy showed the plugin (return codes, token kinds, callbacks in order,
statuses, proxy_get_status messages, metadata) and requires wasmproxy to show the same. Known
and normalised: grpcio hides ``grpc-accept-encoding`` (Envoy passes on the server's), and the
value of ``x-envoy-upstream-service-time`` is a duration.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from envoy_plugins.envoy_harness import Response, http_request
from support.ports import free_ports
from support.processes import EnvoyProcess, ProxyProcess, WasmproxyProcess
from wasm_grpc_support import GrpcTestServer, bootstrap_yaml

pytestmark = pytest.mark.envoy

TARGETS = {"envoy": EnvoyProcess, "wasmproxy": WasmproxyProcess}
LOG_DEADLINE_S = 5.0


@dataclass
class Target:
    process: ProxyProcess
    server: GrpcTestServer
    port: int
    closed_port: int


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Target]]:
    from plugins.build import build, plugin_path

    build(["grpc_callout"])
    workdir = tmp_path_factory.mktemp("grpc")
    started: dict[str, Target] = {}
    try:
        for name, cls in TARGETS.items():
            server = GrpcTestServer()
            listener, admin, closed = free_ports(3)
            path = workdir / f"{name}.yaml"
            path.write_text(bootstrap_yaml(listener_port=listener, admin_port=admin, grpc_port=server.port,
                                           closed_port=closed, plugin=str(plugin_path("grpc_callout"))))
            started[name] = Target(cls(path), server, listener, closed)
            started[name].process.spawn()
        for target in started.values():
            target.process.wait_ready()
        yield started
    finally:
        for target in started.values():
            target.process.stop()
            target.server.stop()


def _normalise(body: str) -> str:
    """Drop grpc-accept-encoding (recounting n=) and the service time's value."""
    out = []
    for line in body.splitlines():
        m = re.fullmatch(r"(initial_metadata|trailing_metadata) n=(\d+)(?: (.*))?", line)
        if m:
            pairs = m.group(3).split(";") if m.group(3) else []
            assert int(m.group(2)) == len(pairs), f"element count and pairs disagree: {line!r}"
            pairs = [re.sub(r"^(x-envoy-upstream-service-time)=\d+$", r"\1=<ms>", p) for p in pairs
                     if not p.startswith("grpc-accept-encoding=")]
            line = f"{m.group(1)} n={len(pairs)}" + (" " + ";".join(pairs) if pairs else "")
        out.append(line)
    return "\n".join(out)


def _ask(targets: dict[str, Target], headers: dict[str, str]) -> dict[str, tuple[int, str | None, str]]:
    """The same request to every target at once: (status, token kind, normalised body)."""
    def one(t: Target) -> tuple[int, str | None, str]:
        # "{grpc}" / "{down}" in a value: this target's gRPC server / closed port (google_grpc URIs).
        mine = {k: v.format(grpc=f"127.0.0.1:{t.server.port}", down=f"127.0.0.1:{t.closed_port}")
                for k, v in headers.items()}
        r: Response = http_request(t.port, headers=mine, timeout=10)
        return r.status, r.header("x-grpc-token-kind"), _normalise(r.body.decode())

    with ThreadPoolExecutor(len(targets)) as pool:
        futures = {name: pool.submit(one, t) for name, t in targets.items()}
        return {name: f.result() for name, f in futures.items()}


CONNECT_FAILURE = ("upstream connect error or disconnect/reset before headers. reset reason: remote connection "
                   "failure")
CONNECT_FAILURE_CLOSE = (CONNECT_FAILURE + "{upstream_reset_before_response_started{remote_connection_failure|"
                         "delayed_connect_error:_Connection_refused}}")
H2 = ":status=200;content-type=application/grpc"

CASES = {
    # unary calls: success is one proxy_on_grpc_receive, failure one proxy_on_grpc_close
    "call": ({"x-grpc-method": "Unary", "x-grpc-message": "hi", "x-grpc-metadata": "x-md=v1"}, "odd",
             "call rc=0\nreceive size=13 echo:hi md=v1"),
    "call_by_cluster_name": ({"x-grpc-message": "hi", "x-grpc-upstream": "name"}, "odd",
                             "call rc=0\nreceive size=7 echo:hi"),
    "call_empty_answer": ({"x-grpc-method": "Empty"}, "odd", "call rc=0\nreceive size=0 "),
    "unknown_cluster_name": ({"x-grpc-cluster": "nope", "x-grpc-upstream": "name"}, "none", "call rc=4"),
    "unknown_cluster_in_service": ({"x-grpc-cluster": "nope"}, "none", "call rc=10"),
    "no_healthy_upstream": ({"x-grpc-cluster": "grpc_empty"}, "none", "call rc=10"),
    "server_down": ({"x-grpc-cluster": "grpc_down"}, "odd",
                    f"call rc=0\ngrpc_close status=14 get_status=14 message={CONNECT_FAILURE_CLOSE}"),
    "unknown_method": ({"x-grpc-method": "Nope"}, "odd",
                       "call rc=0\ngrpc_close status=12 get_status=12 message=Method not found!{via_upstream}"),
    "unknown_service": ({"x-grpc-service": "other.Svc"}, "odd",
                        "call rc=0\ngrpc_close status=12 get_status=12 message=Method not found!{via_upstream}"),
    "server_status": ({"x-grpc-method": "Fail", "x-grpc-message": "5:not here"}, "odd",
                      "call rc=0\ngrpc_close status=5 get_status=5 message=not here{via_upstream}"),
    "server_status_without_message": ({"x-grpc-method": "Fail", "x-grpc-message": "9:"}, "odd",
                                      "call rc=0\ngrpc_close status=9 get_status=9 message=via_upstream"),
    "zero_timeout": ({"x-grpc-method": "Slow", "x-grpc-timeout-ms": "0"}, "odd",
                     "call rc=0\ngrpc_close status=4 get_status=4 message=Deadline Exceeded{via_upstream}"),
    # streams: initial metadata, each message, trailing metadata, close
    "stream_half_closed": (
        {"x-grpc-mode": "stream", "x-grpc-message": "a,b,c", "x-grpc-then": "close", "x-grpc-metadata": "x-md=s"},
        "even",
        "stream rc=0\nsend rc=0\nsend rc=0\nsend rc=0\nclose rc=0\n"
        f"initial_metadata n=5 {H2};x-initial=yes;x-md-echo=s;x-envoy-upstream-service-time=<ms>\n"
        "receive size=6 echo:a\nreceive size=6 echo:b\nreceive size=6 echo:c\n"
        "trailing_metadata n=3 grpc-status=0;grpc-message=;x-trailing=yes\n"
        "grpc_close status=0 get_status=0 message=via_upstream\nclose rc=0"),
    "stream_end_on_last_send": (
        {"x-grpc-mode": "stream", "x-grpc-message": "a,b", "x-grpc-then": "end"}, "even",
        "stream rc=0\nsend rc=0\nsend rc=0\n"
        f"initial_metadata n=4 {H2};x-initial=yes;x-envoy-upstream-service-time=<ms>\n"
        "receive size=6 echo:a\nreceive size=6 echo:b\n"
        "trailing_metadata n=3 grpc-status=0;grpc-message=;x-trailing=yes\n"
        "grpc_close status=0 get_status=0 message=via_upstream\nclose rc=0"),
    "stream_server_status": (
        # the request never ended: no x-envoy-upstream-service-time
        {"x-grpc-mode": "stream", "x-grpc-message": "a,fail", "x-grpc-then": "none"}, "even",
        f"stream rc=0\nsend rc=0\nsend rc=0\ninitial_metadata n=3 {H2};x-initial=yes\nreceive size=6 echo:a\n"
        "trailing_metadata n=2 grpc-status=10;grpc-message=asked to fail\n"
        "grpc_close status=10 get_status=10 message=asked to fail{via_upstream}\nclose rc=0"),
    "stream_trailers_only": (
        {"x-grpc-mode": "stream", "x-grpc-method": "Nope", "x-grpc-message": "a", "x-grpc-then": "close"}, "even",
        "stream rc=0\nsend rc=0\nclose rc=0\ninitial_metadata n=0\n"
        f"trailing_metadata n=5 {H2};grpc-status=12;grpc-message=Method not found!;"
        "x-envoy-upstream-service-time=<ms>\n"
        "grpc_close status=12 get_status=12 message=Method not found!{via_upstream}\nclose rc=0"),
    "stream_server_down": (
        {"x-grpc-mode": "stream", "x-grpc-cluster": "grpc_down", "x-grpc-message": "a", "x-grpc-then": "close"},
        "even",
        "stream rc=0\nsend rc=0\nclose rc=0\ninitial_metadata n=0\n"
        f"trailing_metadata n=4 {H2};grpc-status=14;grpc-message={CONNECT_FAILURE}\n"
        f"grpc_close status=14 get_status=14 message={CONNECT_FAILURE_CLOSE}\nclose rc=0"),
    "stream_unknown_cluster_in_service": ({"x-grpc-mode": "stream", "x-grpc-cluster": "nope"}, "none",
                                          "stream rc=10"),
    "stream_unknown_cluster_name": ({"x-grpc-mode": "stream", "x-grpc-cluster": "nope", "x-grpc-upstream": "name"},
                                    "none", "stream rc=4"),
    "stream_no_healthy_upstream": ({"x-grpc-mode": "stream", "x-grpc-cluster": "grpc_empty"}, "none",
                                   "stream rc=10"),
    "stream_cancel_after_first_message": (
        {"x-grpc-mode": "stream", "x-grpc-message": "a,b", "x-grpc-then": "none", "x-grpc-cancel-on-receive": "1"},
        "even",
        f"stream rc=0\nsend rc=0\nsend rc=0\ninitial_metadata n=3 {H2};x-initial=yes\nreceive size=6 echo:a\n"
        "cancel rc=0"),
    # google_grpc: Envoy's Google gRPC client (grpc-core) shows only the server's metadata and
    # message, INTERNAL without a message when it cannot connect, and skips empty messages.
    "google_call": ({"x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-message": "g",
                     "x-grpc-metadata": "x-md=1"}, "odd", "call rc=0\nreceive size=11 echo:g md=1"),
    "google_call_empty_request": (
        {"x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}"}, "odd",
        "call rc=0\ngrpc_close status=12 get_status=12 message=\"b'/test.Echo/Unary'\" requires exactly one "
        "request message."),
    "google_server_down": ({"x-grpc-upstream": "google", "x-grpc-cluster": "{down}", "x-grpc-message": "x"}, "odd",
                           "call rc=0\ngrpc_close status=13 get_status=13 message="),
    "google_no_target": ({"x-grpc-upstream": "google", "x-grpc-cluster": "", "x-grpc-message": "x"}, "odd",
                         "call rc=0\ngrpc_close status=13 get_status=13 message="),
    "google_unknown_method": (
        {"x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-method": "Nope", "x-grpc-message": "x"},
        "odd", "call rc=0\ngrpc_close status=12 get_status=12 message=Method not found!"),
    "google_stream": (
        {"x-grpc-mode": "stream", "x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-message": "a,,b",
         "x-grpc-then": "close"}, "even",
        "stream rc=0\nsend rc=0\nsend rc=0\nsend rc=0\nclose rc=0\ninitial_metadata n=1 x-initial=yes\n"
        "receive size=6 echo:a\nreceive size=6 echo:b\ntrailing_metadata n=1 x-trailing=yes\n"
        "grpc_close status=0 get_status=0 message=\nclose rc=0"),
    "google_stream_trailers_only": (
        {"x-grpc-mode": "stream", "x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-method": "Nope",
         "x-grpc-message": "a", "x-grpc-then": "close"}, "even",
        "stream rc=0\nsend rc=0\nclose rc=0\ninitial_metadata n=0\ntrailing_metadata n=0\n"
        "grpc_close status=12 get_status=12 message=Method not found!\nclose rc=0"),
    "google_stream_server_status": (
        {"x-grpc-mode": "stream", "x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-message": "a,fail",
         "x-grpc-then": "none"}, "even",
        "stream rc=0\nsend rc=0\nsend rc=0\ninitial_metadata n=1 x-initial=yes\nreceive size=6 echo:a\n"
        "trailing_metadata n=0\ngrpc_close status=10 get_status=10 message=asked to fail\nclose rc=0"),
    "google_stream_server_down": (
        {"x-grpc-mode": "stream", "x-grpc-upstream": "google", "x-grpc-cluster": "{down}", "x-grpc-message": "a",
         "x-grpc-then": "close"}, "even",
        "stream rc=0\nsend rc=0\nclose rc=0\ntrailing_metadata n=0\ngrpc_close status=13 get_status=13 message=\n"
        "close rc=0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_callout(targets: dict[str, Target], case: str) -> None:
    headers, kind, body = CASES[case]
    results = _ask(targets, {"x-grpc-mode": "call", **headers})
    assert results["envoy"] == (200, kind, body)
    assert results["wasmproxy"] == results["envoy"]


def test_call_timeout_is_the_routers(targets: dict[str, Target]) -> None:
    """Envoy's router timer usually beats the server's deadline (the same instant, from grpc-timeout):
    14 "upstream request timeout". On a loaded machine the server's 4 can come first in Envoy;
    wasmproxy always reports the router's."""
    results = _ask(targets, {"x-grpc-mode": "call", "x-grpc-method": "Slow", "x-grpc-timeout-ms": "200"})
    router = (200, "odd",
              "call rc=0\ngrpc_close status=14 get_status=14 message=upstream request timeout{response_timeout}")
    assert results["envoy"] in (router, (200, "odd", "call rc=0\ngrpc_close status=4 get_status=4 "
                                                     "message=Deadline Exceeded{via_upstream}"))
    assert results["wasmproxy"] == router


def test_google_grpc_call_timeout_is_internal_without_a_message(targets: dict[str, Target]) -> None:
    """Envoy's Google client reports its own timeout as 13 and no message (the server's 4 can
    come first in Envoy on a loaded machine)."""
    results = _ask(targets, {"x-grpc-mode": "call", "x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}",
                             "x-grpc-method": "Slow", "x-grpc-message": "x", "x-grpc-timeout-ms": "200"})
    internal = (200, "odd", "call rc=0\ngrpc_close status=13 get_status=13 message=")
    assert results["envoy"] in (internal, (200, "odd", "call rc=0\ngrpc_close status=4 get_status=4 "
                                                       "message=Deadline Exceeded"))
    assert results["wasmproxy"] == internal


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_call_cancelled_at_once_has_no_callbacks_and_never_reaches_the_server(targets: dict[str, Target],
                                                                              how: str) -> None:
    before = {name: t.server.started.count("Slow") for name, t in targets.items()}
    results = _ask(targets, {"x-grpc-mode": "call", "x-grpc-method": "Slow", "x-grpc-then": how})
    assert results["envoy"] == (200, "odd", f"call rc=0\n{how} rc=0")
    assert results["wasmproxy"] == results["envoy"]
    _ask(targets, {"x-grpc-mode": "call"})  # a later call has reached the server: an earlier one would have
    assert {name: t.server.started.count("Slow") for name, t in targets.items()} == before


def test_cancelled_stream_has_no_callbacks_and_ends_on_the_server(targets: dict[str, Target]) -> None:
    results = _ask(targets, {"x-grpc-mode": "stream", "x-grpc-message": "a", "x-grpc-then": "cancel"})
    assert results["envoy"] == (200, "even", "stream rc=0\nsend rc=0\ncancel rc=0")
    assert results["wasmproxy"] == results["envoy"]
    # The reset reaches the server (unlike a unary call's, the stream has started): every
    # stream that reached the handler ends (a reset seen first may skip the handler).
    for name, t in targets.items():
        assert t.server.wait_all_ended("Stream"), f"{name}: a stream is still open on the server"


def _late_events(process: ProxyProcess, count: int) -> list[str]:
    """The plugin's log lines about events for tokens it never got (bounded wait for `count`)."""
    deadline = time.monotonic() + LOG_DEADLINE_S
    while True:
        lines = re.findall(r"grpc_callout: late (.*)", process.log_text())
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)  # polling another process's log file


def test_a_callout_that_fails_to_start_still_reports_to_the_root_context(targets: dict[str, Target]) -> None:
    """Envoy returns InternalFailure and then calls the plugin back with the token it never
    handed out: close 14 "Cluster not available"; with no healthy host, the router's local reply
    (a stream also gets empty initial and the reply's trailing metadata)."""
    counts = {name: len(_late_events(t.process, 0)) for name, t in targets.items()}
    _ask(targets, {"x-grpc-mode": "call", "x-grpc-cluster": "nope"})
    _ask(targets, {"x-grpc-mode": "call", "x-grpc-cluster": "grpc_empty"})
    _ask(targets, {"x-grpc-mode": "stream", "x-grpc-cluster": "grpc_empty"})
    seen = {}
    for name, t in targets.items():
        lines = _late_events(t.process, counts[name] + 5)[counts[name]:]
        seen[name] = [re.sub(r"token \d+", "token <t>", line) for line in lines]
    assert seen["envoy"] == [
        "close token <t> status 14 message Cluster not available",
        "close token <t> status 14 message no healthy upstream{no_healthy_upstream}",
        "initial_metadata token <t>",
        "trailing_metadata token <t>",
        "close token <t> status 14 message no healthy upstream{no_healthy_upstream}",
    ]
    assert seen["wasmproxy"] == seen["envoy"]


_CONNECTION_STATS = ("http2.", "upstream_cx_total", "upstream_cx_active", "upstream_cx_destroy", "upstream_cx_http2",
                     "upstream_rq_pending_total", "bytes", "membership", "match_count")


def _cluster_counters(process: ProxyProcess) -> dict[str, int]:
    """cluster.grpc* counters, without the connection-level ones grpcio keeps to itself."""
    out = {}
    for line in process.admin("/stats").body.decode().splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("cluster.grpc") and value.isdigit() and not any(s in name for s in _CONNECTION_STATS):
            out[name] = int(value)
    return out


@pytest.mark.parametrize("headers", [
    {"x-grpc-message": "x"},
    {"x-grpc-method": "Nope"},
    {"x-grpc-cluster": "grpc_down"},
    {"x-grpc-cluster": "grpc_empty"},
    {"x-grpc-method": "Slow", "x-grpc-then": "cancel"},
    {"x-grpc-mode": "stream", "x-grpc-message": "a", "x-grpc-then": "end"},
    {"x-grpc-mode": "stream", "x-grpc-message": "a", "x-grpc-then": "cancel"},
    {"x-grpc-mode": "stream", "x-grpc-cluster": "grpc_down", "x-grpc-then": "close"},
], ids=["answered", "trailers_only", "connect_failure", "no_healthy_upstream", "call_reset", "stream",
        "stream_reset", "stream_connect_failure"])
def test_cluster_request_stats_are_the_routers(targets: dict[str, Target], headers: dict[str, str]) -> None:
    """upstream_rq_total / _<code> / _completed (and internal.*), _tx_reset, _cx_connect_fail,
    _pending_failure_eject, upstream_cx_none_healthy, lb_healthy_panic: as Envoy's router."""
    before = {name: _cluster_counters(t.process) for name, t in targets.items()}
    _ask(targets, {"x-grpc-mode": "call", **headers})
    deltas = {}
    for name, t in targets.items():
        after = _cluster_counters(t.process)
        deltas[name] = {k: v - before[name].get(k, 0) for k, v in after.items() if v != before[name].get(k, 0)}
    assert deltas["envoy"], "Envoy charged nothing"
    assert deltas["wasmproxy"] == deltas["envoy"]


def _tokens(targets: dict[str, Target], headers: dict[str, str]) -> dict[str, int]:
    def one(t: Target) -> int:
        return int(http_request(t.port, headers=headers, timeout=10).header("x-grpc-token") or -1)

    return {name: one(t) for name, t in targets.items()}


@pytest.mark.parametrize("mode", ["call", "stream"])
def test_tokens_step_by_four_and_only_a_started_callout_takes_one(targets: dict[str, Target], mode: str) -> None:
    """Envoy refuses a service that is neither a GrpcService nor a known cluster (ParseFailure)
    before taking a token; every other outcome, failures to start included, uses one."""
    ok = {"x-grpc-mode": mode, "x-grpc-message": "a", "x-grpc-then": "end" if mode == "stream" else ""}
    first = _tokens(targets, ok)
    _tokens(targets, {"x-grpc-mode": mode, "x-grpc-cluster": "nope", "x-grpc-upstream": "name"})  # ParseFailure
    second = _tokens(targets, ok)
    _tokens(targets, {"x-grpc-mode": mode, "x-grpc-cluster": "nope"})  # InternalFailure
    third = _tokens(targets, ok)
    for name in targets:
        assert (second[name] - first[name], third[name] - second[name]) == (4, 8), name


@pytest.mark.parametrize("headers, expected", [
    ({"x-grpc-metadata": "x-md=1,X-Up=2,x-envoy-internal=no", "x-grpc-timeout-ms": "1234"},
     ["x-md=1", "x-up=2", "x-envoy-internal=true", "x-envoy-expected-rq-timeout-ms=1234"]),
    ({"x-grpc-upstream": "google", "x-grpc-cluster": "{grpc}", "x-grpc-metadata": "x-md=1"}, ["x-md=1"]),
], ids=["envoy_grpc", "google_grpc"])
def test_metadata_the_server_sees(targets: dict[str, Target], headers: dict[str, str], expected: list[str]) -> None:
    """The plugin's metadata (keys lower-cased), then for envoy_grpc the router's own headers,
    replacing the plugin's. user-agent differs and is left out: grpcio always sends its own,
    Envoy's envoy_grpc client none (its Google client grpc-c++'s)."""
    results = _ask(targets, {"x-grpc-mode": "call", "x-grpc-method": "Metadata", "x-grpc-message": "m", **headers})
    for name, (status, _, body) in results.items():
        assert status == 200
        line = body.splitlines()[1]
        assert line.startswith("receive size="), (name, body)
        seen = [m for m in line.split(" ", 2)[2].split("|") if not m.startswith("user-agent=")]
        assert seen == expected, name
