"""Per-request overhead of wasmproxy.asgi.WasmMiddleware (not a test).

Calls a minimal ASGI app directly, then behind 1 and 3 plugins, in-process (no server, no
sockets: only the middleware's cost is measured) and prints the mean time per request.

    python bench/asgi_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wasmproxy.asgi import AsgiPlugin, WasmMiddleware  # noqa: E402

DEMO = ROOT / "wasmproxy" / "demo" / "example.wasm"
HEADERS = ROOT / "plugins" / "out" / "headers.wasm"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


async def run(target: Any, requests: int) -> float:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"x-wasmproxy-plugin", b"demo")],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for _ in range(50):  # warm up (and load the plugins)
        await target(scope, receive, send)
    started = time.perf_counter()
    for _ in range(requests):
        await target(scope, receive, send)
    elapsed = time.perf_counter() - started
    assert sent[-2]["status"] == 200
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    chains: list[tuple[str, Any]] = [
        ("app alone", app),
        ("1 plugin (demo)", WasmMiddleware(app, [AsgiPlugin(DEMO, "bench")])),
        ("3 plugins (demo, headers x2)", WasmMiddleware(app, [
            AsgiPlugin(DEMO, "bench"), AsgiPlugin(HEADERS, "response_headers add response_headers x-a 1", vm_id="b1"),
            AsgiPlugin(HEADERS, "request_headers add request_headers x-b 2", vm_id="b2")])),
    ]
    base = None
    for label, target in chains:
        us = asyncio.run(run(target, args.requests))
        base = us if base is None else base
        print(f"{label:32s} {us:8.1f} us/request   overhead {us - base:8.1f} us")


if __name__ == "__main__":
    main()
