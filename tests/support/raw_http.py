"""A raw HTTP/1.1 client over plain sockets: exact bytes out, exact responses in.

Written over sockets rather than an HTTP library so tests can send malformed requests,
pipeline, reuse a connection on purpose and notice when the peer closed it.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

Headers = list[tuple[str, str]]

# Responses to these never carry a body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


class PeerClosed(Exception):
    """The peer closed (or reset) the connection before a complete response arrived."""

    def __init__(self, received: bytes, partial: Response | None = None) -> None:
        super().__init__(f"connection closed by peer after {len(received)} bytes")
        self.received = received
        self.partial = partial


@dataclass(slots=True)
class Response:
    """One HTTP response as it came off the wire."""

    status: int
    reason: str
    version: str
    headers: Headers
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    interim: list[tuple[int, Headers]] = field(default_factory=list)
    chunked: bool = False
    # False when the connection ended in the middle of the body.
    complete: bool = True

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def build_request(method: str = "GET", path: str = "/", headers: Headers | None = None,
                  body: bytes | None = None, *, host: str | None = "diff.test",
                  chunked: bool = False, version: str = "HTTP/1.1") -> bytes:
    """Serialise a request; adds host (unless given or None) and content-length/chunked framing."""
    hdrs = list(headers or [])
    names = {k.lower() for k, _ in hdrs}
    if host is not None and "host" not in names:
        hdrs.insert(0, ("host", host))
    if body is not None:
        if chunked:
            if "transfer-encoding" not in names:
                hdrs.append(("transfer-encoding", "chunked"))
        elif "content-length" not in names:
            hdrs.append(("content-length", str(len(body))))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
    out = head.encode("latin-1")
    if body:
        out += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    elif chunked and body is not None:
        out += b"0\r\n\r\n"
    return out


class RawConnection:
    """A client connection; every read is bounded by `timeout` seconds."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send exactly `data`; a peer that already closed raises PeerClosed."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerClosed(b"") from e

    def request(self, method: str = "GET", path: str = "/", headers: Headers | None = None,
                body: bytes | None = None, *, host: str | None = "diff.test", chunked: bool = False) -> Response:
        """Send one request (see build_request) and read its response."""
        self.send(build_request(method, path, headers, body, host=host, chunked=chunked))
        return self.read_response(method)

    # --- reading ---------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False at EOF or reset."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete response before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        except socket.timeout as e:
            raise TimeoutError("no complete response before the deadline") from e
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _line(self, deadline: float, got: bytearray) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                got += self._buf[: i + 2]
                del self._buf[: i + 2]
                return line
            if not self._fill(deadline):
                got += self._buf
                raise PeerClosed(bytes(got))

    def _exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            if not self._fill(deadline):
                data = bytes(self._buf)
                self._buf.clear()
                raise PeerClosed(data)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _header_block(self, deadline: float, got: bytearray) -> Headers:
        headers: Headers = []
        while True:
            line = self._line(deadline, got)
            if not line:
                return headers
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip(" \t")))

    def read_response(self, method: str = "GET", timeout: float | None = None,
                      stop_at_interim: bool = False) -> Response:
        """Read one final response, collecting 1xx interim ones (or returning the first of them
        when `stop_at_interim`); raises PeerClosed or TimeoutError."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        interim: list[tuple[int, Headers]] = []
        got = bytearray()
        while True:
            status_line = self._line(deadline, got).decode("latin-1")
            version, _, rest = status_line.partition(" ")
            code, _, reason = rest.partition(" ")
            status = int(code)
            headers = self._header_block(deadline, got)
            if 100 <= status < 200 and status != 101:
                if stop_at_interim:
                    return Response(status, reason, version, headers)
                interim.append((status, headers))
                continue
            break
        resp = Response(status, reason, version, headers, interim=interim)
        if method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        try:
            if "chunked" in te:
                resp.chunked = True
                resp.body, resp.trailers = self._chunked_body(deadline)
            elif resp.header("content-length") is not None:
                resp.body = self._exact(int(resp.header("content-length") or 0), deadline)
            else:
                while self._fill(deadline):
                    pass
                resp.body = bytes(self._buf)
                self._buf.clear()
        except PeerClosed as e:
            resp.complete = False
            resp.body = e.received
            raise PeerClosed(bytes(got) + e.received, resp) from None
        return resp

    def _chunked_body(self, deadline: float) -> tuple[bytes, Headers]:
        body = bytearray()
        got = bytearray()
        while True:
            try:
                size = int(self._line(deadline, got).split(b";")[0], 16)
                if size == 0:
                    return bytes(body), self._header_block(deadline, got)
                body += self._exact(size, deadline)
                if self._exact(2, deadline) != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
            except PeerClosed as e:
                raise PeerClosed(bytes(body) + e.received) from None

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """Whether the peer closes the connection within `timeout` (True at once if it already did).

        Returns False as soon as the peer sends anything instead, or when the time is up.
        """
        if self._buf:
            return False
        if self._eof:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            return True
        return not data
