"""AdminServer: serves an AdminHandler over HTTP/1.1 on the main dispatcher's loop.

Deliberately small: the admin listener carries a few requests from operators
and scrapers, not traffic. httptools parses, the handler answers, we write a
``content-length`` response (Envoy's admin uses chunked encoding; both are
HTTP/1.1) with Envoy's ``server: envoy`` and ``date`` headers. Keep-alive and
pipelining work; ``connection: close`` is honoured. Request bodies are ignored
(no admin endpoint we serve reads one).
"""

from __future__ import annotations

import asyncio
import os
from email.utils import formatdate
from typing import TYPE_CHECKING

import httptools

from wasmproxy.admin.handler import AdminHandler
from wasmproxy.log import get_logger

if TYPE_CHECKING:
    from wasmproxy.event.dispatcher import Dispatcher

__all__ = ["AdminServer"]

_log = get_logger("admin")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _AdminProtocol(asyncio.Protocol):
    """One admin connection: httptools callbacks collect a request, the handler answers."""

    def __init__(self, handler: AdminHandler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(400, [("content-type", "text/plain")], b"upgrade not supported\n", close=True)
        except httptools.HttpParserError:
            self._reply(400, [("content-type", "text/plain")], b"bad request\n", close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        keep_alive = self._parser.should_keep_alive()
        try:
            status, headers, body = self._handler.handle(method, self._url.decode("latin-1"))
        except Exception:
            _log.exception("admin handler failed for %s %r", method, self._url)
            status, headers, body = 500, [("content-type", "text/plain; charset=UTF-8")], b"internal error\n"
        self._reply(status, headers, body, close=not keep_alive)

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        head += [f"{k}: {v}" for k, v in headers]
        head += [f"date: {formatdate(usegmt=True)}", "server: envoy", f"content-length: {len(body)}"]
        if close:
            head.append("connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            transport.close()


class AdminServer:
    """The admin listener. Main thread: ``await start()`` on ``dispatcher.loop``; ``close()`` there too."""

    def __init__(
        self,
        handler: AdminHandler,
        dispatcher: Dispatcher,
        host: str = "127.0.0.1",
        port: int = 0,
        address_path: str | None = None,
    ) -> None:
        self._handler = handler
        self._dispatcher = dispatcher
        self._host = host
        self._port = port
        self._address_path = address_path
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port). Writes ``--admin-address-path`` if set."""
        loop = self._dispatcher.loop
        self._server = await loop.create_server(lambda: _AdminProtocol(self._handler), self._host, self._port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        if self._address_path:
            tmp = f"{self._address_path}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.address[0]}:{self.address[1]}")
            os.replace(tmp, self._address_path)
        _log.info("admin address: %s:%d", *self.address)
        return self.address

    def close(self) -> None:
        """Stop accepting; open connections finish their current reply."""
        if self._server is not None:
            self._server.close()
            self._server = None
