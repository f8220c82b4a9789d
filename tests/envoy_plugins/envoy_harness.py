"""Run the test plugins in real Envoy 1.40: an echo upstream, a generated bootstrap, a raw client.

One `EnvoyRun` per test module: it starts one Envoy with one loopback listener per
`Listener` (each with its own Wasm filters), an echo upstream in a thread, and waits until
admin /ready says LIVE. Listener and admin ports are chosen by Envoy (port 0) and read back
from admin, so there is no port race. Requests go through a tiny HTTP/1.1 client that also
sends and reads trailers.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("WASMPROXY_ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))
# The proxies every assertion here pins: the same flags, config and requests for both.
PROXY_COMMANDS: dict[str, list[str]] = {
    "envoy": [str(ENVOY_BIN)],
    "wasmproxy": [sys.executable, "-m", "wasmproxy"],
}


def selected_proxies() -> list[str]:
    """Proxies to run the plugin tests on: WASMPROXY_PLUGIN_PROXIES (default "envoy,wasmproxy")."""
    names = [n.strip() for n in os.environ.get("WASMPROXY_PLUGIN_PROXIES", "envoy,wasmproxy").split(",") if n.strip()]
    unknown = set(names) - set(PROXY_COMMANDS)
    if unknown:
        raise ValueError(f"WASMPROXY_PLUGIN_PROXIES: unknown proxies {sorted(unknown)}")
    return names
LOOPBACK = "127.0.0.1"
READY_DEADLINE_S = 30.0
_base_ids = itertools.count(1)
if str(REPO) not in sys.path:  # `plugins` is a top-level directory of the repo, not an installed package
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- echo upstream


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with JSON describing it; request headers steer the response.

    x-echo-status: <code>            response status (default 200)
    x-echo-body: <text>              response body instead of the JSON description
    x-echo-header: k=v[,k=v...]      extra response headers
    x-echo-trailers: k=v[,k=v...]    respond chunked with these trailers
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _read_body(self) -> tuple[bytes, list[tuple[str, str]]]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            trailers = []
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                trailers.append((k.strip().lower(), v.strip()))
            return body, trailers
        return self.rfile.read(int(self.headers.get("content-length", "0"))), []

    def _handle(self) -> None:
        self.server.requests_seen += 1  # type: ignore[attr-defined]
        body, trailers = self._read_body()
        info = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
            "trailers": trailers,
        }
        status = int(self.headers.get("x-echo-status", "200"))
        out = self.headers["x-echo-body"].encode() if "x-echo-body" in self.headers else json.dumps(info).encode()
        self.send_response(status)
        for item in filter(None, self.headers.get("x-echo-header", "").split(",")):
            k, _, v = item.partition("=")
            self.send_header(k.strip(), v.strip())
        resp_trailers = [i.partition("=") for i in filter(None, self.headers.get("x-echo-trailers", "").split(","))]
        if resp_trailers:
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            chunk = f"{len(out):x}\r\n".encode() + out + b"\r\n" if out else b""
            tail = "".join(f"{k.strip()}: {v.strip()}\r\n" for k, _, v in resp_trailers)
            self.wfile.write(chunk + b"0\r\n" + tail.encode() + b"\r\n")
        else:
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    requests_seen = 0  # requests whose headers arrived (read by tests between requests)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients (Envoy) resetting upstream requests on purpose is normal here: no tracebacks."""


class EchoUpstream:
    """The echo server on a loopback port chosen by the kernel, served from a thread."""

    def __init__(self) -> None:
        self.server = _QuietServer((LOOPBACK, 0), _EchoHandler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="echo-upstream", daemon=True)
        self._thread.start()

    @property
    def requests_seen(self) -> int:
        return self.server.requests_seen

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------ client


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of a header (lower-case name), or None."""
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def trailer(self, name: str) -> str | None:
        return next((v for k, v in self.trailers if k == name), None)

    def echo(self) -> dict[str, Any]:
        """The echo upstream's description of the request it received."""
        return json.loads(self.body)

    def echo_header(self, name: str) -> str | None:
        return next((v for k, v in self.echo()["headers"] if k == name), None)


def _read_line(f: Any) -> bytes:
    line = f.readline(65537)
    if not line:
        raise ConnectionError("connection closed before the response completed")
    return line


def http_request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: list[tuple[str, str]] | dict[str, str] | None = None,
    body: bytes | list[bytes] | None = None,
    trailers: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection. A list body (or trailers) is sent chunked, one chunk each."""
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    chunked = isinstance(body, list) or trailers is not None
    lines = [f"{method} {path} HTTP/1.1", "host: plugins.test"] + [f"{k}: {v}" for k, v in hdrs]
    if chunked:
        lines.append("transfer-encoding: chunked")
        chunks = body if isinstance(body, list) else ([body] if body else [])
        payload = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks if c)
        payload += b"0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in trailers or []).encode() + b"\r\n"
    else:
        payload = body or b""
        if payload or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(payload)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(request)
        f = sock.makefile("rb")
        status = int(_read_line(f).split()[1])
        resp_headers = []
        while (line := _read_line(f)) != b"\r\n":
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers.append((k.strip().lower(), v.strip()))
        get = dict(resp_headers).get
        resp_body, resp_trailers = b"", []
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif (get("transfer-encoding") or "").lower() == "chunked":
            while (size := int(_read_line(f).split(b";")[0], 16)) != 0:
                resp_body += f.read(size)
                _read_line(f)
            while (line := _read_line(f)) != b"\r\n":
                k, _, v = line.decode("latin-1").partition(":")
                resp_trailers.append((k.strip().lower(), v.strip()))
        elif get("content-length") is not None:
            resp_body = f.read(int(get("content-length") or 0))
        else:
            resp_body = f.read()
        return Response(status, resp_headers, resp_body, resp_trailers)


# ------------------------------------------------------------------- config


def wasm_filter(
    plugin: str | Path,
    configuration: str | None = None,
    *,
    root_id: str = "",
    vm_id: str = "",
    vm_configuration: str | None = None,
    failure_policy: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """An envoy.filters.http.wasm entry running plugin (a path) with StringValue configurations."""
    vm_config: dict[str, Any] = {
        "vm_id": vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(plugin)}},
    }
    if vm_configuration is not None:
        vm_config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": vm_configuration}
    config: dict[str, Any] = {"name": name or Path(plugin).stem, "root_id": root_id, "vm_config": vm_config}
    if configuration is not None:
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration}
    if failure_policy:
        config["failure_policy"] = failure_policy
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config},
    }


@dataclass
class Listener:
    """A loopback listener whose HTTP filter chain is `filters` then the router to cluster echo."""

    name: str
    filters: list[dict[str, Any]]
    route_timeout: str = "5s"


def bootstrap(listeners: list[Listener], echo_port: int) -> dict[str, Any]:
    def listener(spec: Listener) -> dict[str, Any]:
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": spec.name,
            "http_protocol_options": {"enable_trailers": True},
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "echo", "timeout": spec.route_timeout}}
                        ],
                    }
                ]
            },
            "http_filters": [
                *spec.filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        }
        return {
            "name": spec.name,
            "address": {"socket_address": {"address": LOOPBACK, "port_value": 0}},
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
            ],
        }

    def cluster(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}},
                }
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}
                ],
            },
        }

    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": 0}}},
        "static_resources": {
            "listeners": [listener(spec) for spec in listeners],
            "clusters": [cluster("echo", echo_port)],
        },
    }


# ---------------------------------------------------------------------- run


class EnvoyRun:
    """One proxy process (`proxy`: a PROXY_COMMANDS name, real Envoy by default) serving
    `listeners`, plus the echo upstream. Use as a context manager."""

    def __init__(self, listeners: list[Listener], log_level: str = "warning", extra_args: tuple[str, ...] = (),
                 concurrency: int = 1, proxy: str = "envoy") -> None:
        self.proxy = proxy
        self.listeners = listeners
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = extra_args
        self.ports: dict[str, int] = {}
        self.admin_port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="envoy-plugins-")
        self.dir = Path(self._dir.name)
        self.log_path = self.dir / "envoy.log"
        self.echo: EchoUpstream | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EnvoyRun:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_ready: bool = True) -> None:
        self.echo = EchoUpstream()
        config = self.dir / "envoy.json"
        config.write_text(json.dumps(bootstrap(self.listeners, self.echo.port), indent=1))
        base_id = (os.getpid() * 89 + next(_base_ids)) % 4_000_000 + 1000
        argv = [*PROXY_COMMANDS[self.proxy], "-c", str(config), "--concurrency", str(self.concurrency), "--base-id", str(base_id),
                "--disable-hot-restart", "-l", self.log_level, "--admin-address-path", str(self.dir / "admin"), *self.extra_args]
        with open(self.log_path, "wb") as log:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=REPO)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Poll admin /ready until LIVE (bounded); then read every listener's port from admin."""
        deadline = time.monotonic() + READY_DEADLINE_S
        admin_file = self.dir / "admin"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proxy} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if admin_file.exists() and admin_file.read_text().strip():
                self.admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
                try:
                    if self.admin("/ready").strip() == "LIVE":
                        break
                except OSError:
                    pass
            time.sleep(0.05)  # readiness poll of an external process (bounded by the deadline)
        else:
            raise RuntimeError(f"{self.proxy} not ready within {READY_DEADLINE_S}s:\n{self.log_text()[-4000:]}")
        statuses = json.loads(self.admin("/listeners?format=json"))["listener_statuses"]
        for status in statuses:
            self.ports[status["name"]] = status["local_address"]["socket_address"]["port_value"]

    def wait_exit(self, timeout: float = READY_DEADLINE_S) -> int:
        """For configs Envoy must reject: its exit code (raises if it keeps running)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.admin_port}{path}", timeout=5) as resp:
            return resp.read().decode()

    def stat(self, name: str) -> int | None:
        """A counter or gauge value from admin /stats, or None if absent."""
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return None

    def request(self, listener: str, method: str = "GET", path: str = "/", **kwargs: Any) -> Response:
        return http_request(self.ports[listener], method, path, **kwargs)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, terminate_timeout: float = 10.0) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after terminate_timeout) and the echo upstream."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=terminate_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.echo is not None:
            self.echo.stop()
            self.echo = None
        self._dir.cleanup()


def plugin(name: str) -> str:
    """Path of a built test plugin (builds it if missing or stale)."""
    from plugins.build import plugin_path

    return plugin_path(name)
