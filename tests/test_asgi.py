"""WasmMiddleware under a real ASGI server: uvicorn in-process on a free loopback port, the
example Starlette app (examples/asgi_app.py) behind the project's test plugins."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from examples.asgi_app import DEMO_PLUGIN, make_app  # noqa: E402
from tests.wasm_filter_support import plugin_path  # noqa: E402
from wasmproxy.asgi import AsgiPlugin, WasmMiddleware  # noqa: E402


def serve(app: Any, client_steps: Callable[[Any], Awaitable[None]]) -> None:
    """Run `app` under uvicorn on 127.0.0.1:<free port> and `client_steps(client)` against it.

    The socket listens before uvicorn starts, so the client never waits for readiness."""

    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", loop="asyncio"))
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                await client_steps(client)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
            sock.close()

    asyncio.run(main())


def test_demo_plugin_in_front_of_the_example_app() -> None:
    async def steps(client: Any) -> None:
        r = await client.get("/echo", params={"q": "1"}, headers={"x-wasmproxy-plugin": "demo"})
        assert r.status_code == 200 and r.headers["x-wasmproxy-demo"] == "from-asgi"
        seen = r.json()
        assert seen["path"] == "/echo" and seen["query"] == "q=1" and seen["headers"]["x-wasmproxy-plugin"] == "demo"

    serve(make_app(), steps)


def test_request_and_response_edits_and_chained_plugins() -> None:
    app = make_app([AsgiPlugin(plugin_path("headers"), "response_headers add response_headers x-from-config c",
                               vm_id="asgi-headers"),
                    AsgiPlugin(plugin_path("as_header"), "from-as", root_id="as_header", vm_id="asgi-as")])

    async def steps(client: Any) -> None:
        r = await client.get("/echo", headers={
            "x-headers-ops": "request_headers add request_headers x-added a;request_headers remove request_headers x-drop",
            "x-drop": "1"})
        assert r.status_code == 200
        assert (r.headers["x-from-config"], r.headers["x-as-header"]) == ("c", "from-as")
        headers = r.json()["headers"]
        assert headers["x-added"] == "a" and "x-drop" not in headers

    serve(app, steps)


def test_bodies_go_through_the_plugin_both_ways() -> None:
    app = make_app([AsgiPlugin(plugin_path("body"), vm_id="asgi-body")])

    async def steps(client: Any) -> None:
        r = await client.post("/echo", content=b"abcdef", headers={"x-body-ops": "request buffer;request append !"})
        assert r.json()["body"] == "abcdef!"
        r = await client.get("/text", params={"text": "shout"}, headers={"x-body-ops": "response buffer;response upper"})
        assert r.text == "SHOUT"

    serve(app, steps)


def test_local_reply_short_circuits_the_app() -> None:
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    wrapped = WasmMiddleware(app, [AsgiPlugin(plugin_path("local_reply"), vm_id="asgi-local-reply")])

    async def steps(client: Any) -> None:
        r = await client.get("/a", headers={"x-local-reply-phase": "request_headers", "x-local-reply-status": "418",
                                            "x-local-reply-body": "teapot"})
        assert (r.status_code, r.text) == (418, "teapot") and calls == []
        r = await client.get("/b", headers={"x-local-reply-phase": "response_headers", "x-local-reply-status": "401",
                                            "x-local-reply-body": "nope"})
        assert (r.status_code, r.text) == (401, "nope") and calls == ["/b"]
        r = await client.get("/c")
        assert (r.status_code, r.text) == (200, "app")

    serve(wrapped, steps)


def test_timers_run_on_the_servers_loop_and_shared_data_is_per_process() -> None:
    app = make_app([AsgiPlugin(plugin_path("pause"), "tick_ms 5", vm_id="asgi-pause"),
                    AsgiPlugin(plugin_path("shared"), vm_id="asgi-shared")])

    async def steps(client: Any) -> None:
        r = await client.get("/echo", headers={"x-pause-request": "tick"})
        assert r.status_code == 200 and r.json()["headers"]["x-resumed-by"] == "tick"
        counters = [int((await client.get("/text")).headers["x-shared-counter"]) for _ in range(3)]
        assert counters == [counters[0], counters[0] + 1, counters[0] + 2]

    serve(app, steps)


def test_http_call_through_the_callout_and_metrics() -> None:
    async def callout(cluster: str, headers: list[tuple[str, str]], body: bytes,
                      timeout_ms: int) -> tuple[int, list[tuple[str, str]], bytes]:
        return 202, [("content-type", "text/plain")], dict(headers).get("x-echo-body", "").upper().encode()

    app = make_app([AsgiPlugin(plugin_path("pause"), vm_id="asgi-pause-callout"),
                    AsgiPlugin(plugin_path("metrics"), vm_id="asgi-metrics", vm_configuration="asgi_")],
                   callout=callout, clusters=["echo"])

    async def steps(client: Any) -> None:
        seen = (await client.get("/echo", headers={"x-pause-request": "http_call"})).json()["headers"]
        assert (seen["x-callout-status"], seen["x-callout-body"]) == ("202", "CALLOUT-BODY")
        await client.get("/text")

    serve(app, steps)
    assert app.metric("asgi_requests") == 2


def test_http_call_without_a_callout_is_bad_argument_and_app_errors_are_500() -> None:
    app = make_app([AsgiPlugin(plugin_path("pause"), vm_id="asgi-pause-nocallout")])

    async def steps(client: Any) -> None:
        seen = (await client.get("/echo", headers={"x-pause-request": "http_call"})).json()["headers"]
        assert seen["x-http-call-status"] == "2"
        r = await client.get("/fail")
        assert r.status_code == 500

    serve(app, steps)


def test_demo_plugin_path_exists() -> None:
    assert DEMO_PLUGIN.exists()


def test_streamed_bodies_and_a_paused_response() -> None:
    app = make_app([AsgiPlugin(plugin_path("body"), vm_id="asgi-body-stream"),
                    AsgiPlugin(plugin_path("pause"), "tick_ms 5", vm_id="asgi-pause-response")])

    async def upload() -> Any:
        for part in (b"ab", b"cd", b"ef"):
            yield part

    async def steps(client: Any) -> None:
        r = await client.post("/echo", content=upload(), headers={"x-body-ops": "request buffer;request append !"})
        assert r.json()["body"] == "abcdef!"
        # Streaming mode: the plugin upper-cases each chunk as it passes.
        r = await client.get("/stream", params={"text": "a b c"}, headers={"x-body-ops": "response upper"})
        assert r.text == "A B C "
        r = await client.get("/text", headers={"x-pause-response": "tick"})
        assert (r.status_code, r.headers["x-resumed-by"], r.text) == (200, "tick", "hello from starlette")

    serve(app, steps)


def test_concurrent_requests_each_paused_on_its_own_tick() -> None:
    app = make_app([AsgiPlugin(plugin_path("pause"), "tick_ms 5", vm_id="asgi-pause-concurrent")])

    async def steps(client: Any) -> None:
        async def one(i: int) -> tuple[int, str, str]:
            r = await client.get("/echo", params={"i": str(i)}, headers={"x-pause-request": "tick"})
            return r.status_code, r.json()["query"], r.json()["headers"]["x-resumed-by"]

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert results == [(200, f"i={i}", "tick") for i in range(20)]

    serve(app, steps)
    assert app.metric("pause_waiting") == 0
