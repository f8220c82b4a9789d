"""WasmMiddleware: Proxy-Wasm HTTP filters in front of any ASGI application.

    app = WasmMiddleware(app, plugins=[AsgiPlugin("auth.wasm", "config text")])

Each request goes through the plugins' filter chain (the proxy's real FilterManager and Wasm
HTTP filter) before the app: request headers and body pass through every plugin in order, a
local reply from a plugin answers without calling the app, and the app's response headers
and body pass back through the plugins (in reverse order) to the client. The plugins' VMs
live once per process, on the server's event loop: their timers (proxy_on_tick) run there,
and shared data and queues are the process's, keyed by vm_id as in the proxy.

http_call: pass ``callout`` (an async function (cluster, headers, body, timeout_ms) ->
(status, headers, body)) and ``clusters`` (the names it serves); without it, every
http_call is BadArgument (no such cluster). Not supported: request trailers (ASGI has none)
and response trailers from the app (the plugin's own trailers are dropped); gRPC callouts.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import unquote

from .event.dispatcher import RealTimeSource
from .http.filter import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus, PassThroughFilter
from .http.filter_manager import FilterManager
from .http.headers import HeaderMap
from .http.stream_info import Address, ConnectionInfo, StreamInfo
from .log import get_logger
from .stats.store import Store
from .testing.config import Configuration, plugin_config
from .server_context import standalone_factory_context
from .wasm.http_filter import WasmFilter
from .wasm.plugin import PluginConfig

__all__ = ["AsgiPlugin", "Callout", "WasmMiddleware"]

_log = get_logger("wasm")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: async (cluster, headers, body, timeout_ms) -> (status, headers, body)
Callout = Callable[[str, list[tuple[str, str]], bytes, int],
                   Awaitable[tuple[int, list[tuple[str, str]], bytes]]]


@dataclass
class AsgiPlugin:
    """One plugin of the chain, as its envoy.extensions.wasm.v3.PluginConfig would say."""

    wasm: str | Path | bytes
    configuration: Configuration = None
    vm_configuration: Configuration = None
    name: str | None = None
    root_id: str = ""
    vm_id: str = ""
    failure_policy: str = "FAIL_CLOSED"


# -- the event loop as a Wasm's dispatcher ------------------------------------------------------


class _LoopTimer:
    """Envoy's Event::Timer on an asyncio loop: one-shot, re-armed by enable_timer."""

    __slots__ = ("_loop", "_cb", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, cb: Callable[[], None]) -> None:
        self._loop = loop
        self._cb = cb
        self._handle: asyncio.TimerHandle | None = None

    def enable_timer(self, ms: float) -> None:
        self.disable_timer()
        self._handle = self._loop.call_later(max(ms, 0) / 1000.0, self._fire)

    def disable_timer(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def enabled(self) -> bool:
        return self._handle is not None

    def _fire(self) -> None:
        self._handle = None
        self._cb()


class _LoopDispatcher:
    """post / create_timer / time_source for Wasms that run on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = "main_thread"
        self.loop = loop
        self.time_source = RealTimeSource()
        self.thread_id = threading.get_ident()

    def post(self, cb: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(cb)

    def create_timer(self, cb: Callable[[], None]) -> _LoopTimer:
        return _LoopTimer(self.loop, cb)

    def is_thread_safe(self) -> bool:
        return threading.get_ident() == self.thread_id


# -- http_call through a user callout -----------------------------------------------------------


class _CalloutClient:
    """AsyncClient over the `callout` coroutine: answers arrive on a later loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callout: Callout | None,
                 clusters: frozenset[str]) -> None:
        self._loop = loop
        self._callout = callout
        self._clusters = clusters
        self._tasks: set[asyncio.Task[None]] = set()

    # ThreadLocalClusterManager
    def get(self, name: str) -> object | None:
        return self if self._callout is not None and name in self._clusters else None

    def http_async_client(self) -> "_CalloutClient":
        return self

    # ClusterManager
    def thread_local(self) -> "_CalloutClient":
        return self

    def send(self, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap | None, timeout_ms: int,
             callbacks: Any) -> object:
        assert self._callout is not None
        callout = self._callout

        async def run() -> None:
            try:
                call = callout(cluster, list(headers.items()), bytes(body), timeout_ms)
                status, response_headers, response_body = await (
                    asyncio.wait_for(call, timeout_ms / 1000.0) if timeout_ms else call)
            except Exception as e:  # noqa: BLE001 (any failure is the callout's failure)
                _log.debug("http_call to %s failed: %r", cluster, e)
                callbacks.on_failure("reset")
                return
            callbacks.on_success(HeaderMap([(":status", str(status))] + list(response_headers)),
                                 bytes(response_body), None)

        task = self._loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# -- one request ----------------------------------------------------------------------------------


class _Client:
    """The FilterManager's downstream: turns what reaches the client into ASGI messages."""

    def __init__(self, exchange: "_Exchange") -> None:
        self.exchange = exchange

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if not k.startswith(":")]
        self.exchange.emit({"type": "http.response.start", "status": int(headers.get(":status") or 200),
                            "headers": raw})
        if end_stream:
            self.end_stream()

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        """The ASGI server answers Expect: 100-continue itself."""

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if data or end_stream:
            self.exchange.emit({"type": "http.response.body", "body": bytes(data), "more_body": not end_stream})
        if end_stream:
            self.exchange.finish_response()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.end_stream()  # ASGI servers without the trailers extension: the body just ends

    def end_stream(self) -> None:
        if not self.exchange.response_done:
            self.exchange.emit({"type": "http.response.body", "body": b"", "more_body": False})
            self.exchange.finish_response()

    def reset_stream(self) -> None:
        self.exchange.reset = True
        self.exchange.finish_response()

    def create_filter_chain(self) -> None:
        """Installed when the exchange starts."""

    def route(self) -> object | None:
        return None

    def clear_route_cache(self) -> None:
        """No routes in front of an app."""

    def __getattr__(self, name: str) -> Any:
        # Watermarks and request timeouts: the ASGI server does its own flow control.
        if name.startswith(("on_", "disarm_", "add_downstream_", "remove_downstream_")):
            return lambda *args: None
        raise AttributeError(name)


class _App(PassThroughFilter):
    """The terminal filter: the request as the plugins left it goes to the ASGI app."""

    def __init__(self, exchange: "_Exchange") -> None:
        self.exchange = exchange

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        self.exchange.start_app(headers)
        if end_stream:
            self.exchange.request_body.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.exchange.request_body.put_nowait({"type": "http.request", "body": bytes(data), "more_body": not end_stream})
        data.clear()
        return FilterDataStatus.StopIterationNoBuffer

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.exchange.request_body.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        return FilterTrailersStatus.StopIteration


class _Exchange:
    """One HTTP request: client -> plugins -> app -> plugins -> client."""

    def __init__(self, middleware: "WasmMiddleware", scope: Scope, send: Send) -> None:
        self.middleware = middleware
        self.scope = scope
        self.send = send
        self.outgoing: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.request_body: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.response_done = False
        self.reset = False
        self.app_task: asyncio.Task[None] | None = None
        self._app_headers: list[tuple[str, str]] | None = None
        self._done = asyncio.Event()
        client = scope.get("client") or ("127.0.0.1", 0)
        server = scope.get("server") or ("127.0.0.1", 0)
        info = StreamInfo(connection=ConnectionInfo(id=id(self), local_address=Address(server[0], server[1] or 0),
                                                    remote_address=Address(client[0], client[1])))
        self.manager = FilterManager(_Client(self), middleware._dispatcher, info, id(self))  # type: ignore[arg-type]
        for config in middleware._configs:
            wasm_filter = WasmFilter()
            context = config.create_context(wasm_filter)
            if context is None:  # FAIL_OPEN and a dead VM: this stream skips the plugin
                continue
            wasm_filter.context = context
            self.manager.add_stream_filter(wasm_filter)
            self.manager.add_access_log_handler(wasm_filter)
        self.app_filter = _App(self)
        self.manager.add_stream_decoder_filter(self.app_filter)

    def emit(self, message: dict[str, Any]) -> None:
        self.outgoing.put_nowait(message)

    def finish_response(self) -> None:
        if not self.response_done:
            self.response_done = True
            self.outgoing.put_nowait(None)
            self._done.set()

    def request_headers(self) -> HeaderMap:
        scope = self.scope
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        authority = next((v for k, v in headers if k == "host"), None) or "localhost"
        pseudo = [(":method", scope.get("method", "GET")), (":path", path.decode("latin-1")),
                  (":authority", authority), (":scheme", scope.get("scheme", "http"))]
        return HeaderMap(pseudo + [(k, v) for k, v in headers if k != "host"])

    # -- the app side ---------------------------------------------------------------------------

    def start_app(self, headers: HeaderMap) -> None:
        """The request headers passed every plugin: call the app with them."""
        scope = dict(self.scope)
        path = headers.get(":path") or "/"
        raw_path, _, query = path.partition("?")
        scope["method"] = headers.get(":method") or scope.get("method", "GET")
        scope["raw_path"] = raw_path.encode("latin-1")
        scope["path"] = unquote(raw_path)
        scope["query_string"] = query.encode("latin-1")
        authority = headers.get(":authority")
        pairs = [(k, v) for k, v in headers.items() if not k.startswith(":")]
        if authority:
            pairs.insert(0, ("host", authority))
        scope["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
        self.app_task = asyncio.get_running_loop().create_task(self._run_app(scope))

    async def _app_receive(self) -> dict[str, Any]:
        if self.request_body.empty() and (self.response_done or self.reset):
            return {"type": "http.disconnect"}
        getter = asyncio.ensure_future(self.request_body.get())
        done_waiter = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({getter, done_waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done_waiter.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return {"type": "http.disconnect"}

    async def _app_send(self, message: dict[str, Any]) -> None:
        if self.response_done or self.reset or self.manager.destroyed:
            return  # a plugin answered (or the stream is gone): the app's response is dropped
        callbacks = self.app_filter.decoder_callbacks
        kind = message["type"]
        if kind == "http.response.start":
            self._app_headers = [(":status", str(message["status"]))] + [
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", ())]
        elif kind == "http.response.body":
            body, more = bytes(message.get("body", b"")), bool(message.get("more_body", False))
            if self._app_headers is not None:
                headers, self._app_headers = self._app_headers, None
                callbacks.encode_headers(HeaderMap(headers), not more and not body)
                if not more and not body:
                    return
            if not (self.response_done or self.reset or self.manager.destroyed):
                callbacks.encode_data(body, not more)

    async def _run_app(self, scope: Scope) -> None:
        try:
            await self.middleware.app(scope, self._app_receive, self._app_send)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("ASGI app failed")
            if not (self.response_done or self.reset or self.manager.destroyed):
                if self.manager.response_headers is None:
                    self.app_filter.decoder_callbacks.send_local_reply(500, b"", None, None, "asgi_app_error")
                else:
                    self.manager.reset_stream()

    # -- the client side ------------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body, more = bytes(first.get("body", b"")), bool(first.get("more_body", False))
        self.manager.decode_headers(self.request_headers(), not body and not more)
        if (body or more) and not self.response_done and not self.manager.destroyed:
            self.manager.decode_data(body, not more)
        reader = asyncio.get_running_loop().create_task(self._read_request(receive)) if more else None
        try:
            while True:
                message = await self.outgoing.get()
                if message is None:
                    break
                await self.send(message)
        finally:
            if reader is not None:
                reader.cancel()
            if self.app_task is not None and not self.app_task.done():
                self.app_task.cancel()
            self.manager.log()
            self.manager.destroy_filters()

    async def _read_request(self, receive: Receive) -> None:
        while not self.response_done:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.response_done:
                    self.manager.reset_stream()
                return
            more = bool(message.get("more_body", False))
            if not self.manager.destroyed and not self.response_done:
                self.manager.decode_data(bytes(message.get("body", b"")), not more)
            if not more:
                return


class WasmMiddleware:
    """Run Proxy-Wasm HTTP filters (`plugins`, first one first on the request) in front of `app`.

    The plugins load on the server's loop at lifespan startup (or the first request); a plugin
    that does not load raises wasmproxy.config.errors.ConfigError there. ``stats`` is the Store
    of the plugins' metrics (``wasmcustom.*``) and the wasm.* lifecycle stats.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 plugins: Iterable[AsgiPlugin | str | Path], *, callout: Callout | None = None,
                 clusters: Iterable[str] = ()) -> None:
        self.app = app
        self.plugins = [p if isinstance(p, AsgiPlugin) else AsgiPlugin(p) for p in plugins]
        self.callout = callout
        self.clusters = frozenset(clusters)
        self.stats = Store("main_thread")
        self._configs: list[PluginConfig] = []
        self._dispatcher: _LoopDispatcher | None = None

    def _ensure_loaded(self) -> None:
        loop = asyncio.get_running_loop()
        if self._dispatcher is not None:
            if self._dispatcher.loop is not loop:
                raise RuntimeError("WasmMiddleware serves one event loop (its plugins' VMs live there)")
            return
        dispatcher = _LoopDispatcher(loop)
        context = standalone_factory_context(dispatcher, _CalloutClient(loop, self.callout, self.clusters), self.stats)
        configs = [PluginConfig(plugin_config(p.wasm, p.configuration, vm_configuration=p.vm_configuration,
                                              name=p.name, root_id=p.root_id, vm_id=p.vm_id,
                                              failure_policy=p.failure_policy), context)  # type: ignore[arg-type]
                   for p in self.plugins]
        self._configs, self._dispatcher = configs, dispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            async def lifespan_receive() -> dict[str, Any]:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._ensure_loaded()
                return message

            await self.app(scope, lifespan_receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # websockets pass untouched
            return
        self._ensure_loaded()
        await _Exchange(self, scope, send).run(receive)

    def metric(self, name: str) -> int | None:
        """A counter's or gauge's value ("wasmcustom." optional), or None."""
        for full in (name, f"wasmcustom.{name}"):
            if full in self.stats.counters:
                return self.stats.counters[full].value
            if full in self.stats.gauges:
                return self.stats.gauges[full].value
        return None
