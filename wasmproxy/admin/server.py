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
import socket
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
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def bind(self) -> tuple[str, int]:
        """Any thread: bind the listening socket now, so a bad address fails here (OSError)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        name = sock.getsockname()
        self.address = (name[0], name[1])
        return self.address

    async def start(self) -> tuple[str, int]:
        """On the dispatcher's loop: serve (binding first if ``bind`` was not called); returns
        the bound (host, port). Writes ``address_path`` (Envoy's ``--admin-address-path``)."""
        if self._sock is None:
            self.bind()
        sock = self._sock
        assert sock is not None
        loop = self._dispatcher.loop
        self._server = await loop.create_server(lambda: _AdminProtocol(self._handler), sock=sock)
        assert self.address is not None
        if self._address_path:
            tmp = f"{self._address_path}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.address[0]}:{self.address[1]}")
            os.replace(tmp, self._address_path)
        _log.info("admin address: %s:%d", *self.address)
        return self.address

    def close(self) -> None:
        """Dispatcher thread: stop accepting; open connections finish their current reply."""
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
