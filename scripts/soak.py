"""Soak test: many requests through wasmproxy with plugin traps, upstream faults and client aborts.

    python scripts/soak.py [--requests 1000000] [--concurrency 2] [--connections 16] [--json]

Starts the echo upstream (``python -m wasmproxy.demo.upstream``) and ``python -m wasmproxy``
(``--concurrency`` workers) with the ``trap`` plugin under FAIL_RELOAD (10 ms backoff), then
sends the requests over ``--connections`` keep-alive connections, each one of:

    ok          GET /                                  -> 200
    trap        x-trap-phase: request_headers          -> 503 (the plugin traps; its VM is reloaded)
    trap_resp   x-trap-phase: response_headers         -> 503
    status      x-echo-status: 500                     -> 500
    reset       x-echo-reset: before-headers           -> 503 (upstream reset)
    delay       x-echo-delay-ms: 20                    -> 200
    abort       the client sends the request on a new connection and closes it unanswered

A request that lands on a worker whose VM failed and is inside the reload backoff gets the
policy's 503 (FAIL_RELOAD acts as FAIL_CLOSED until the reload): counted as ``policy_503``.
A response whose headers went through the plugin and whose VM then failed (another stream on
the same worker trapped) before its body is reset, as Envoy's CHECK_FAIL does: ``policy_reset``.
Anything else is a ``mismatch``; no answer within ``--timeout-s`` is ``hung``.

Reported: counts per kind and outcome, requests/s, the proxy's RSS after warm-up and at the
end, and admin /stats gauges before and after: ``wasm.envoy.wasm.runtime.v8.active`` (live
VMs), ``wasm.wasm_vm_count`` and ``wasmproxy.wasm.contexts_active`` (contexts of live VMs not
yet released). Exit status 0 when nothing hung or mismatched, the gauges are back to their
baseline and RSS grew by less than ``--max-rss-growth-mib`` after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS: dict[str, tuple[list[tuple[str, str]], set[int]]] = {
    # kind: (request headers, expected statuses)
    "ok": ([], {200}),
    "trap": ([("x-trap-phase", "request_headers")], {503}),
    "trap_resp": ([("x-trap-phase", "response_headers")], {503}),
    "status": ([("x-echo-status", "500")], {500}),
    "reset": ([("x-echo-reset", "before-headers")], {503}),
    "delay": ([("x-echo-delay-ms", "20")], {200}),
    "abort": ([("x-echo-delay-ms", "20")], set()),
}
# Share of each kind (the rest are "ok").
MIX = {"trap": 0.02, "trap_resp": 0.02, "status": 0.05, "reset": 0.03, "delay": 0.05, "abort": 0.03}
GAUGES = ("wasm.envoy.wasm.runtime.v8.active", "wasm.wasm_vm_count", "wasmproxy.wasm.contexts_active")
PLUGIN_NAME = "soak"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _config(listener_port: int, admin_port: int, upstream_port: int, plugin: str) -> dict[str, Any]:
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": PLUGIN_NAME, "failure_policy": "FAIL_RELOAD",
                   "reload_config": {"backoff": {"base_interval": "0.010s"}},
                   "vm_config": {"vm_id": "soak", "runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": plugin}}}}}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                    ".HttpConnectionManager",
           "stat_prefix": "soak", "codec_type": "AUTO",
           "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "echo", "timeout": "10s"}}]}]},
           "http_filters": [wasm, {"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    cluster = {"name": "echo", "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [{"endpoint": {
                   "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]}}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {
                "listeners": [{"name": "soak", "address": {"socket_address": {"address": "127.0.0.1",
                                                                              "port_value": listener_port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [cluster]}}


# -- a minimal HTTP/1.1 client ------------------------------------------------------------------


class _Closed(Exception):
    """The connection closed before a whole response; `headers` if they had arrived."""

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    try:
        return await _read_response_or_raise(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise _Closed(f"closed before the response headers: {e}") from e


async def _read_response_or_raise(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    try:
        return status, headers, await _read_body(reader, headers)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise _Closed(f"{status} then closed mid-body: {e}", headers) from e


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return body


def _request_bytes(kind: str, n: int) -> bytes:
    headers, _ = KINDS[kind]
    lines = [f"GET /soak/{n} HTTP/1.1", "host: soak"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class _Results:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    done: int = 0

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        self.done += 1
        if outcome in ("mismatch", "hung") and len(self.examples) < 10:
            self.examples.append(f"{kind}: {outcome} {detail}")


class _Load:
    def __init__(self, port: int, kinds: list[str], timeout_s: float, results: _Results) -> None:
        self.port = port
        self.kinds = kinds
        self.next = 0
        self.timeout_s = timeout_s
        self.results = results

    def take(self) -> int | None:
        if self.next >= len(self.kinds):
            return None
        n, self.next = self.next, self.next + 1
        return n

    async def _abort(self, n: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(_request_bytes("abort", n))
        await writer.drain()
        writer.transport.abort()
        self.results.record("abort", "aborted")

    async def worker(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while (n := self.take()) is not None:
            kind = self.kinds[n]
            if kind == "abort":
                await self._abort(n)
                continue
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert reader is not None
            writer.write(_request_bytes(kind, n))
            try:
                status, headers, body = await asyncio.wait_for(_read_response(reader), self.timeout_s)
            except asyncio.TimeoutError:
                self.results.record(kind, "hung", f"request {n}")
                writer.transport.abort()
                reader = writer = None
                continue
            except _Closed as e:
                if e.headers is not None and "x-trap-plugin" in e.headers:
                    # The plugin saw the response headers, then its VM failed (another stream's
                    # trap) before the body: Envoy's CHECK_FAIL fails this stream too, and a
                    # response already started can only be reset.
                    self.results.record(kind, "policy_reset")
                else:
                    self.results.record(kind, "mismatch", f"request {n}: {e}")
                writer.transport.abort()
                reader = writer = None
                continue
            expected = KINDS[kind][1]
            if status in expected:
                self.results.record(kind, str(status))
            elif status == 503 and b"upstream" not in body and "x-trap-plugin" not in headers:
                self.results.record(kind, "policy_503")
            else:
                self.results.record(kind, "mismatch", f"request {n}: {status} {body[:80]!r}")
            if headers.get("connection", "").lower() == "close":
                writer.transport.abort()
                reader = writer = None
        if writer is not None:
            writer.close()


# -- the proxy ----------------------------------------------------------------------------------


def _admin_get(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


def _gauges(admin_port: int) -> dict[str, int]:
    out = {}
    for line in _admin_get(admin_port, "/stats").splitlines():
        name, _, value = line.partition(": ")
        if name in GAUGES or name.startswith(f"wasm.{PLUGIN_NAME}.vm_reload"):
            out[name] = int(value)
    return out


def _rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def _wait_until(predicate: Any, deadline_s: float, what: str) -> None:
    """Poll an external process (bounded)."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ready(admin_port: int, listener_port: int) -> bool:
    try:
        return "LIVE" in _admin_get(admin_port, "/ready") and bool(socket.create_connection(
            ("127.0.0.1", listener_port), timeout=1).close() or True)
    except OSError:
        return False


def _kinds(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    rest = 1.0 - sum(weights)
    return [rng.choices(names + ["ok"], weights + [rest])[0] for _ in range(n)]


async def _run_load(port: int, kinds: list[str], connections: int, timeout_s: float, results: _Results) -> None:
    load = _Load(port, kinds, timeout_s, results)
    await asyncio.gather(*(load.worker() for _ in range(connections)))


def soak(requests: int, concurrency: int, connections: int, timeout_s: float, seed: int,
         warmup: int, max_rss_growth_mib: float) -> dict[str, Any]:
    from plugins.build import plugin_path

    plugin = plugin_path("trap")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        upstream = subprocess.Popen([sys.executable, "-m", "wasmproxy.demo.upstream", "--port", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, text=True)
        proxy = None
        try:
            assert upstream.stdout is not None
            upstream_port = int(upstream.stdout.readline().rsplit(":", 1)[1])
            listener_port, admin_port = _free_ports(2)
            cfg = Path(tmp) / "soak.json"
            cfg.write_text(json.dumps(_config(listener_port, admin_port, upstream_port, plugin)))
            log = open(Path(tmp) / "proxy.log", "wb")
            proxy = subprocess.Popen([sys.executable, "-m", "wasmproxy", "-c", str(cfg), "--concurrency",
                                      str(concurrency), "-l", "error"], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO)
            _wait_until(lambda: _ready(admin_port, listener_port), 60, "the proxy to be ready")
            baseline = _gauges(admin_port)
            kinds = _kinds(requests, seed)
            results = _Results()
            warm = min(warmup, requests)
            started = time.monotonic()
            asyncio.run(_run_load(listener_port, kinds[:warm], connections, timeout_s, results))
            rss_warm = _rss_mib(proxy.pid)
            asyncio.run(_run_load(listener_port, kinds[warm:], connections, timeout_s, results))
            elapsed = time.monotonic() - started
            rss_end = _rss_mib(proxy.pid)
            # Aborted streams and reloads settle on the workers: wait for the gauges (bounded).
            end: dict[str, int] = {}

            def settled() -> bool:
                end.update(_gauges(admin_port))
                return all(end.get(g) == baseline.get(g) for g in GAUGES)

            try:
                _wait_until(settled, 10, "the wasm gauges to return to their baseline")
            except RuntimeError:
                pass
            proxy_alive = proxy.poll() is None
            log.close()
            # Errors other than the plugin's own traps, for a failed run.
            log_tail = [line for line in (Path(tmp) / "proxy.log").read_text(errors="replace").splitlines()
                        if line.startswith("[") and "][wasm]" not in line][-15:]
        finally:
            for p in (proxy, upstream):
                if p is not None and p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
    by_outcome: Counter[str] = Counter()
    for (_, outcome), count in results.outcomes.items():
        by_outcome[outcome] += count
    report = {
        "requests": requests, "concurrency": concurrency, "connections": connections,
        "elapsed_s": round(elapsed, 1), "requests_per_s": round(requests / elapsed) if elapsed else 0,
        "answered_or_failed_per_policy": results.done - by_outcome["mismatch"] - by_outcome["hung"],
        "mismatch": by_outcome["mismatch"], "hung": by_outcome["hung"],
        "outcomes": {f"{k}:{o}": c for (k, o), c in sorted(results.outcomes.items())},
        "rss_mib": {"after_warmup": round(rss_warm, 1), "end": round(rss_end, 1),
                    "growth": round(rss_end - rss_warm, 1)},
        "gauges_baseline": {g: baseline.get(g) for g in GAUGES},
        "gauges_end": {g: end.get(g) for g in GAUGES},
        "vm_reloads": {k: v for k, v in end.items() if k.startswith(f"wasm.{PLUGIN_NAME}.")},
        "proxy_alive": proxy_alive,
        "examples": results.examples,
    }
    if results.examples or not proxy_alive:
        report["proxy_log_tail"] = log_tail
    report["ok"] = bool(
        proxy_alive and results.done == requests and report["mismatch"] == 0 and report["hung"] == 0
        and report["gauges_end"] == report["gauges_baseline"] and rss_end - rss_warm < max_rss_growth_mib)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--concurrency", type=int, default=2, help="proxy worker threads")
    p.add_argument("--connections", type=int, default=16, help="client keep-alive connections")
    p.add_argument("--timeout-s", type=float, default=15.0, help="a request unanswered this long is hung")
    p.add_argument("--warmup", type=int, default=5000, help="requests before the first RSS sample")
    p.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    args = p.parse_args(argv)
    report = soak(args.requests, args.concurrency, args.connections, args.timeout_s, args.seed, args.warmup,
                  args.max_rss_growth_mib)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
