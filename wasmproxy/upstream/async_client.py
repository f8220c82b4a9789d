"""AsyncClient: outbound requests from inside the proxy (Wasm http_call), on one thread.

As in Envoy (source/common/http/async_client_impl.cc), each request runs the real
router filter behind a small stream that plays the connection manager's part, so
an outbound call sees exactly what a proxied request would: a route timeout is a
504 "upstream request timeout" *response*, a connect failure a 503 "upstream
connect error or disconnect/reset before headers. reset reason: ..." response,
no host a 503 "no healthy upstream". Only a reset after the response started is a
failure (`on_failure("reset")`).

Owner thread only. `send` may complete inline (e.g. no healthy upstream): then the
callbacks have already run and it returns None, as Envoy's AsyncClient::send does.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..http.headers import HeaderMap
from ..http.stream_info import Address, ConnectionInfo, StreamInfo

from envoy.config.route.v3 import route_pb2

from ..router.config import Route, RouteConfig
from ..router.router_filter import Router, RouterConfig

if TYPE_CHECKING:
    from .cluster_manager import ThreadLocalClusterManager


class AsyncClientCallbacks(Protocol):
    def on_success(self, headers: HeaderMap, body: bytes, trailers: HeaderMap | None) -> None: ...

    def on_failure(self, reason: str) -> None:
        """Envoy's FailureReason: "reset" (the stream was reset after the response began)."""


_ROUTE_CACHE_MAX = 256
_local_address: str | None = None


def local_address() -> str:
    """The first non-loopback IPv4 interface address, else 127.0.0.1 (Network::Utility::getLocalAddress)."""
    global _local_address
    if _local_address is None:
        _local_address = "127.0.0.1"
        try:
            import fcntl
            import struct

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _, name in socket.if_nameindex():
                    try:
                        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                    except OSError:
                        continue
                    addr = socket.inet_ntoa(packed[20:24])
                    if not addr.startswith("127."):
                        _local_address = addr
                        break
        except (ImportError, OSError):  # pragma: no cover - not Linux
            pass
    return _local_address
_next_stream_id = 0


class AsyncRequest:
    """One outbound request; it is the router's decoder-filter callbacks. `cancel()` drops it silently."""

    def __init__(self, client: "AsyncClient", route: "Route", callbacks: AsyncClientCallbacks) -> None:
        global _next_stream_id
        _next_stream_id += 1
        self.stream_id = _next_stream_id
        self._client = client
        self.dispatcher: Any = client.dispatcher
        self._route = route
        self._callbacks = callbacks
        self.stream_info = StreamInfo(client.connection_info)
        self._response_headers: HeaderMap | None = None
        # The response body: the first chunk as it came, a bytearray once a second one arrives.
        self._body: bytes | bytearray = b""
        self._trailers: HeaderMap | None = None
        self.complete = False
        self._router: Router = Router(client.router_config)
        self._router.callbacks = self  # type: ignore[assignment]  # set_decoder_filter_callbacks (no watermark callbacks here)

    def route(self) -> Route:
        return self._route

    def clear_route_cache(self) -> None:
        pass

    def cancel(self) -> None:
        """Withdraw the request; no callback runs afterwards."""
        if not self.complete:
            self.complete = True
            self._router.on_destroy()

    # -- the router's StreamDecoderFilterCallbacks --------------------------------------------------

    def send_local_reply(
        self,
        status: int,
        body: bytes | str,
        modify_headers: Callable[[HeaderMap], None] | None = None,
        grpc_status: int | None = None,
        details: str = "",
    ) -> None:
        data = body.encode() if isinstance(body, str) else bytes(body)
        headers = HeaderMap([(":status", str(status))])
        if modify_headers is not None:
            modify_headers(headers)
        if data:
            headers.set("content-length", str(len(data)))
            headers.set("content-type", "text/plain")
        self.stream_info.response_code_details = details
        self.encode_headers(headers, not data)
        if data:
            self.encode_data(data, True)

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        pass

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self._response_headers = headers
        status = headers.first_values.get(":status") or "0"
        self.stream_info.response_code = int(status) if status.isdigit() else 0
        if end_stream:
            self._finish()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        body = self._body
        if type(body) is bytearray:
            body += data
        elif not body and type(data) is bytes:  # kept as it is: immutable
            self._body = data
        else:
            self._body = bytearray(body) + data
        if end_stream:
            self._finish()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self._trailers = trailers
        self._finish()

    def reset_stream(self) -> None:
        if not self.complete:
            self.complete = True
            self._router.on_destroy()
            self._callbacks.on_failure("reset")

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        pass

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._router.on_destroy()
        assert self._response_headers is not None
        body = self._body
        self._callbacks.on_success(self._response_headers, body if type(body) is bytes else bytes(body), self._trailers)

    def _start(self, headers: HeaderMap, body: bytes, trailers: HeaderMap | None) -> None:
        # RequestOptions defaults: send_internal and send_xff (the server's local address).
        headers.set("x-envoy-internal", "true")
        xff = headers.first_values.get("x-forwarded-for")
        local = _local_address or local_address()
        headers.set("x-forwarded-for", f"{xff},{local}" if xff else local)
        router = self._router
        end_headers = not body and trailers is None
        router.decode_headers(headers, end_headers)
        if body and not self.complete:
            router.decode_data(bytearray(body), trailers is None)
        if trailers is not None and not self.complete:
            router.decode_trailers(trailers)


class AsyncClient:
    """Per-thread outbound HTTP client over the thread's clusters."""

    def __init__(self, cluster_manager: "ThreadLocalClusterManager") -> None:
        self._cm = cluster_manager
        self.dispatcher = cluster_manager.dispatcher
        self.router_config: RouterConfig = RouterConfig(None, lambda: cluster_manager)
        # The downstream "connection" of every request (read only): built once, not per request.
        any_address = Address("0.0.0.0", 0)
        self.connection_info = ConnectionInfo(0, any_address, any_address)
        self._routes: dict[tuple[str, int], Route] = {}

    def send(
        self,
        cluster: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap | None,
        timeout_ms: int,
        callbacks: AsyncClientCallbacks,
    ) -> AsyncRequest | None:
        """Start a request; None if it completed inline or the cluster does not exist (no callback then)."""
        if cluster not in self._cm._clusters:  # self._cm.get(cluster) is None
            return None
        request = AsyncRequest(self, self._route(cluster, timeout_ms), callbacks)
        request._start(headers, body, trailers)
        return None if request.complete else request

    def _route(self, cluster: str, timeout_ms: int) -> Route:
        key = (cluster, timeout_ms)
        route = self._routes.get(key)
        if route is None:
            proto = route_pb2.RouteConfiguration()
            vh = proto.virtual_hosts.add(name="async_client", domains=["*"])
            r = vh.routes.add()
            r.match.prefix = "/"
            r.route.cluster = cluster
            r.route.timeout.FromMilliseconds(max(0, timeout_ms))
            route = RouteConfig.from_proto(proto).virtual_hosts[0].routes[0]
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[key] = route
        return route
