"""Real Envoy 1.40 with the grpc_callout plugin: facts about its gRPC callouts that the
differential test (tests/test_wasm_grpc.py) normalises away or that only Envoy shows.

The bootstrap is tests/wasm_grpc_support.py's (HTTP/2 clusters grpc, grpc_down, grpc_empty).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy_harness import http_request, plugin
from support.ports import free_ports
from support.processes import EnvoyProcess
from wasm_grpc_support import GrpcTestServer, bootstrap_yaml

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, GrpcTestServer]]:
    with GrpcTestServer() as server:
        listener, admin, closed = free_ports(3)
        path = tmp_path_factory.mktemp("envoy_grpc") / "envoy.yaml"
        path.write_text(bootstrap_yaml(listener_port=listener, admin_port=admin, grpc_port=server.port,
                                       closed_port=closed, plugin=plugin("grpc_callout")))
        with EnvoyProcess(path):
            yield listener, server


def _body(envoy: tuple[int, GrpcTestServer], **headers: str) -> list[str]:
    r = http_request(envoy[0], headers={k.replace("_", "-"): v for k, v in headers.items()})
    assert r.status == 200
    return r.body.decode().splitlines()


def test_stream_metadata_is_the_response_header_map(envoy: tuple[int, GrpcTestServer]) -> None:
    """The server's grpc-accept-encoding is passed on (grpcio hides it from wasmproxy), and the
    router's x-envoy-upstream-service-time comes only when the request had ended."""
    ended = _body(envoy, x_grpc_mode="stream", x_grpc_message="a", x_grpc_then="end")
    assert ended[2].startswith("initial_metadata n=5 :status=200;content-type=application/grpc;"
                               "grpc-accept-encoding=identity, deflate, gzip;x-initial=yes;"
                               "x-envoy-upstream-service-time=")
    open_ = _body(envoy, x_grpc_mode="stream", x_grpc_message="a,fail", x_grpc_then="none")
    assert open_[3] == ("initial_metadata n=4 :status=200;content-type=application/grpc;"
                        "grpc-accept-encoding=identity, deflate, gzip;x-initial=yes")


def test_a_unary_call_reports_no_metadata(envoy: tuple[int, GrpcTestServer]) -> None:
    """The server sends initial and trailing metadata; a unary call only hears the message
    (or, on failure, only the close)."""
    assert _body(envoy, x_grpc_mode="call", x_grpc_message="m") == ["call rc=0", "receive size=6 echo:m"]
    assert _body(envoy, x_grpc_mode="call", x_grpc_method="Fail", x_grpc_message="7:no") == [
        "call rc=0", "grpc_close status=7 get_status=7 message=no{via_upstream}"]


def test_unary_call_cancelled_in_the_same_vm_call_never_reaches_the_server(
        envoy: tuple[int, GrpcTestServer]) -> None:
    server = envoy[1]
    slow = server.started.count("Slow")
    assert _body(envoy, x_grpc_mode="call", x_grpc_method="Slow", x_grpc_then="cancel") == [
        "call rc=0", "cancel rc=0"]
    _body(envoy, x_grpc_mode="call")  # a later call reached the server: the cancelled one would have
    assert server.started.count("Slow") == slow
