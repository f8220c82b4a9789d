"""An example Starlette app behind a Proxy-Wasm plugin (wasmproxy.asgi.WasmMiddleware).

Run it:  uvicorn examples.asgi_app:app --port 8000
then:    curl -i localhost:8000/echo -H 'x-wasmproxy-plugin: demo'

The demo plugin (wasmproxy/demo/example.wasm) adds ``x-wasmproxy-demo: <its configuration>``
to every response; `make_app` takes any other plugins instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Iterable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from wasmproxy.asgi import AsgiPlugin, WasmMiddleware

DEMO_PLUGIN = Path(__file__).resolve().parents[1] / "wasmproxy" / "demo" / "example.wasm"


async def echo(request: Request) -> Response:
    """What the app got, after the plugins: method, path, headers and body."""
    body = await request.body()
    return JSONResponse({"method": request.method, "path": request.url.path, "query": request.url.query,
                         "headers": dict(request.headers), "body": body.decode("utf-8", "replace")})


async def text(request: Request) -> Response:
    return PlainTextResponse(request.query_params.get("text", "hello from starlette"))


async def stream(request: Request) -> Response:
    """The words of ?text=, one response chunk each."""
    words = request.query_params.get("text", "one two three").split()

    async def chunks() -> AsyncIterator[bytes]:
        for word in words:
            yield word.encode() + b" "

    return StreamingResponse(chunks(), media_type="text/plain")


async def fail(request: Request) -> Response:
    raise RuntimeError("the app failed")


routes = [Route("/echo", echo, methods=["GET", "POST", "PUT"]), Route("/text", text), Route("/stream", stream),
          Route("/fail", fail)]


def make_app(plugins: Iterable[AsgiPlugin] | None = None, **options: Any) -> WasmMiddleware:
    """The Starlette app behind `plugins` (default: the demo plugin, configured "from-asgi")."""
    if plugins is None:
        plugins = [AsgiPlugin(DEMO_PLUGIN, "from-asgi")]
    return WasmMiddleware(Starlette(routes=routes), plugins=list(plugins), **options)


app = make_app()
