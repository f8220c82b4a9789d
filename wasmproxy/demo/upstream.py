"""A loopback HTTP/1.1 echo upstream: the demo's backend and the tests' observable server.

Every request is answered with a JSON document describing what arrived (method, path,
ordered headers, body length and sha256, the body itself when small, trailers), so a test
can see exactly what a proxy forwarded. Request headers named ``x-echo-*`` steer the
response, which lets one upstream play every backend behaviour the tests need:

``x-echo-status: N``        respond with status N
``x-echo-delay-ms: N``      respond after N ms (an event-loop timer; other connections go on)
``x-echo-body-size: N``     respond with N bytes of a fixed pattern instead of JSON, streamed
``x-echo-chunked: 1``       use ``transfer-encoding: chunked``
``x-echo-no-length: 1``     send neither content-length nor chunked: the body ends at close
``x-echo-headers: a:1,b:2`` add these response headers, names as given (values cannot contain commas)
``x-echo-trailers: a:1``    send these trailers (implies chunked)
``x-echo-close: 1``         send ``connection: close`` and close after the response
``x-echo-interim: 100,103`` send these 1xx interim responses before the final one
``x-echo-reset: before-headers | after-headers``
                            abort the connection before any response byte, or after the
                            headers and part of the body

Run it with ``python -m wasmproxy.demo.upstream --port N`` or in-process with
:func:`start_in_thread`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass, field

import httptools

# Bodies up to this size are echoed back verbatim in the JSON document.
ECHO_BODY_LIMIT = 64 * 1024
# Generated bodies are written in chunks of this size, waiting for the transport to drain.
WRITE_CHUNK = 64 * 1024
_PATTERN = bytes(range(32, 127)) * (WRITE_CHUNK // 95 + 1)

_REASONS = {
    100: "Continue", 102: "Processing", 103: "Early Hints", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def pattern_bytes(offset: int, size: int) -> bytes:
    """The generated response body is a repeating printable pattern; this returns a slice of it."""
    out = bytearray()
    while len(out) < size:
        start = (offset + len(out)) % 95
        take = min(size - len(out), len(_PATTERN) - start)
        out += _PATTERN[start:start + take]
    return bytes(out)


def _parse_header_list(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.split(","):
        name, sep, val = item.partition(":")
        if sep and name.strip():
            pairs.append((name.strip(), val.strip()))
    return pairs


@dataclass(slots=True)
class EchoRequest:
    """One request as the upstream received it."""

    method: str = ""
    path: str = ""
    http_version: str = "1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    body_length: int = 0
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    small_body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def report(self) -> dict[str, object]:
        body = None
        if self.body_length <= ECHO_BODY_LIMIT:
            body = bytes(self.small_body).decode("utf-8", "backslashreplace")
        return {
            "method": self.method,
            "path": self.path,
            "http_version": self.http_version,
            "headers": [[k, v] for k, v in self.headers],
            "body_length": self.body_length,
            "body_sha256": self.sha256.hexdigest(),
            "body": body,
            "trailers": [[k, v] for k, v in self.trailers],
        }


_BAD_REQUEST = EchoRequest(method="<unparsable>")


class EchoProtocol(asyncio.Protocol):
    """One downstream connection: parse with httptools, answer requests in order."""

    def __init__(self, connections: set[EchoProtocol]) -> None:
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: EchoRequest | None = None
        self._headers_done = False
        # None: the request stream ended (upgrade); _BAD_REQUEST: it could not be parsed.
        self._queue: asyncio.Queue[EchoRequest | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)
        self._writer = self._loop.create_task(self._respond_loop())

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._queue.put_nowait(None)
        except httptools.HttpParserError:
            self._queue.put_nowait(_BAD_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        self._can_write.set()
        if self._writer is not None:
            self._writer.cancel()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = EchoRequest()
        self._headers_done = False

    def on_url(self, url: bytes) -> None:
        assert self._current is not None
        self._current.path += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        (self._current.trailers if self._headers_done else self._current.headers).append(pair)

    def on_headers_complete(self) -> None:
        req = self._current
        assert req is not None
        self._headers_done = True
        req.method = self._parser.get_method().decode("latin-1")
        req.http_version = self._parser.get_http_version()
        req.keep_alive = self._parser.should_keep_alive()
        expect = req.header("expect")
        if expect is not None and expect.lower() == "100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self._current
        assert req is not None
        req.body_length += len(body)
        req.sha256.update(body)
        if len(req.small_body) <= ECHO_BODY_LIMIT:
            req.small_body += body[: ECHO_BODY_LIMIT + 1 - len(req.small_body)]

    def on_message_complete(self) -> None:
        assert self._current is not None
        self._queue.put_nowait(self._current)
        self._current = None

    # responding
    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def _drain(self) -> None:
        await self._can_write.wait()
        if self._transport is None:
            raise ConnectionResetError("echo downstream went away")

    async def _respond_loop(self) -> None:
        while True:
            req = await self._queue.get()
            if req is None or self._transport is None:
                self._close()
                return
            try:
                if req is _BAD_REQUEST:
                    raise ValueError("unparsable request")
                keep_open = await self._respond(req)
            except ValueError:  # the request, or one of its x-echo-* values, is malformed
                self._write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                keep_open = False
            except ConnectionResetError:
                return
            if not keep_open:
                self._close()
                return

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Reset the connection: SO_LINGER 0 makes close() send RST instead of FIN."""
        if self._transport is not None:
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()

    async def _respond(self, req: EchoRequest) -> bool:
        """Write one response; return whether the connection stays open."""
        delay_ms = req.header("x-echo-delay-ms")
        if delay_ms:
            timer_done = self._loop.create_future()
            handle = self._loop.call_later(int(delay_ms) / 1000.0, timer_done.set_result, None)
            try:
                await timer_done
            finally:
                handle.cancel()
        reset = (req.header("x-echo-reset") or "").lower()
        if reset == "before-headers":
            self.abort()
            return False
        for code in filter(None, (req.header("x-echo-interim") or "").split(",")):
            self._write(f"HTTP/1.1 {int(code)} {_REASONS.get(int(code), 'Unknown')}\r\n\r\n".encode())

        status = int(req.header("x-echo-status") or 200)
        extra = _parse_header_list(req.header("x-echo-headers") or "")
        trailers = _parse_header_list(req.header("x-echo-trailers") or "")
        chunked = bool(req.header("x-echo-chunked")) or bool(trailers)
        close_delimited = bool(req.header("x-echo-no-length")) and not chunked
        close = bool(req.header("x-echo-close")) or not req.keep_alive or close_delimited
        body_size = req.header("x-echo-body-size")
        no_body = status in (204, 304) or 100 <= status < 200
        if body_size is not None:
            content_type, length, body = "application/octet-stream", int(body_size), None
        else:
            body = json.dumps(req.report()).encode() + b"\n"
            content_type, length = "application/json", len(body)

        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        if not no_body:
            head.append(f"content-type: {content_type}")
            if chunked:
                head.append("transfer-encoding: chunked")
            elif not close_delimited:
                head.append(f"content-length: {length}")
        head += [f"{k}: {v}" for k, v in extra]
        if close:
            head.append("connection: close")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        if reset == "after-headers":
            if not no_body and req.method != "HEAD":
                self._write(self._frame(pattern_bytes(0, min(length, 16)), chunked))
            self.abort()
            return False
        if no_body or req.method == "HEAD":
            return not close

        if body is not None:
            self._write(self._frame(body, chunked))
        else:
            sent = 0
            while sent < length:
                n = min(WRITE_CHUNK, length - sent)
                self._write(self._frame(pattern_bytes(sent, n), chunked))
                sent += n
                await self._drain()
        if chunked:
            tail = "".join(f"{k}: {v}\r\n" for k, v in trailers)
            self._write(f"0\r\n{tail}\r\n".encode("latin-1"))
        return not close

    @staticmethod
    def _frame(data: bytes, chunked: bool) -> bytes:
        if not chunked or not data:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(host: str = "127.0.0.1", port: int = 0,
                connections: set[EchoProtocol] | None = None) -> asyncio.Server:
    """Start the echo upstream on the running loop; the caller owns the returned server.

    Open connections are kept in `connections` (when given) so an owner can close them too:
    asyncio.Server.close() leaves accepted connections alone.
    """
    loop = asyncio.get_running_loop()
    live = connections if connections is not None else set()
    return await loop.create_server(lambda: EchoProtocol(live), host, port, reuse_address=True)


class EchoUpstream:
    """The echo upstream on its own thread and event loop; stop() closes it and joins the thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._connections: set[EchoProtocol] = set()
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> int:
        """Start serving; return the bound port (any thread; raises what binding raised)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection, then join the thread (any thread but its own)."""
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(serve(self.host, self.port, self._connections))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # surfaced to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for conn in list(self._connections):
                conn.abort()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()


def start_in_thread(host: str = "127.0.0.1", port: int = 0) -> tuple[EchoUpstream, int]:
    """Start an echo upstream on a daemon thread; returns (server, bound port). Call server.stop()."""
    server = EchoUpstream(host, port)
    return server, server.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wasmproxy.demo.upstream", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)

    async def run() -> None:
        server = await serve(args.host, args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"echo upstream listening on {args.host}:{port}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
