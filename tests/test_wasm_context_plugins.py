"""The real test plugins (plugins/out/, C against the raw ABI) driven through the sans-IO core.

The expectations are the ones tests/envoy_plugins/test_envoy_headers.py pins against real
Envoy 1.40, minus what needs a proxy (upstream echo, codec). Skipped when the plugins are not
built (`python -m plugins.build`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.wasm_host.fakes import FakeStreamEnv, stream_info
from wasmproxy.http.filter import FilterHeadersStatus
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.abi import AbiVersion
from wasmproxy.wasm.context import ContextBase, Plugin
from wasmproxy.wasm.runtime import compile_module
from wasmproxy.wasm.wasm import Wasm

OUT = Path(__file__).resolve().parents[1] / "plugins" / "out"

OPS = ";".join([
    "request_headers add request_headers x-req-added a",
    "request_headers replace request_headers user-agent replaced",
    "request_headers remove request_headers x-drop",
    "request_headers get request_headers x-missing",
    "request_headers get request_headers x-present",
    "request_headers size request_headers",
    "request_headers keys request_headers",
    "request_trailers add request_trailers x-rt-added 1",
    "request_trailers remove request_trailers x-rt-drop",
    "response_headers add response_headers x-resp-added r",
    "response_headers remove response_headers content-type",
    "response_headers replace response_headers x-replace-me new",
    "response_headers add request_headers x-late v",
    "response_trailers add response_trailers x-rtr-added 2",
    "response_trailers replace response_trailers x-up-trailer changed",
])


def load(name: str, configuration: bytes = b"") -> tuple[Wasm, Plugin]:
    path = OUT / f"{name}.wasm"
    if not path.exists():
        pytest.skip(f"{path} not built (python -m plugins.build)")
    wasm = Wasm(compile_module(path.read_bytes(), name=name), post=lambda cb: None, vm_id=name)
    assert wasm.initialize(), wasm.fail_message
    plugin = Plugin(name=name, root_id="", vm_id=name, plugin_configuration=configuration)
    root = wasm.start(plugin)
    assert root is not None and wasm.configure(root, plugin)
    return wasm, plugin


def run_stream(ctx: ContextBase, request: HeaderMap, request_trailers: HeaderMap,
               response: HeaderMap, response_trailers: HeaderMap) -> None:
    assert ctx.decode_headers(request, False) == FilterHeadersStatus.Continue
    ctx.decode_data(bytearray(b"abc"), False)
    ctx.decode_trailers(request_trailers)
    assert ctx.encode_headers(response, False) == FilterHeadersStatus.Continue
    ctx.encode_data(bytearray(b"body"), False)
    ctx.encode_trailers(response_trailers)
    ctx.on_destroy()


@pytest.mark.parametrize("name", ["headers", "headers_abi020", "headers_abi010"])
def test_headers_plugin_edits_like_envoy(name: str) -> None:
    wasm, plugin = load(name)
    expected_abi = {"headers": AbiVersion.ProxyWasm_0_2_1, "headers_abi020": AbiVersion.ProxyWasm_0_2_0,
                    "headers_abi010": AbiVersion.ProxyWasm_0_1_0}[name]
    assert wasm.abi_version == expected_abi
    request = HeaderMap([(":authority", "h"), (":path", "/"), (":method", "POST"), (":scheme", "http"),
                         ("x-headers-ops", OPS), ("x-drop", "1"), ("x-present", "p"), ("user-agent", "ua")])
    request_trailers = HeaderMap([("x-rt-drop", "1"), ("x-rt-keep", "k")])
    response = HeaderMap([(":status", "200"), ("content-type", "application/json"), ("x-replace-me", "old")])
    response_trailers = HeaderMap([("x-up-trailer", "orig")])
    ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
    run_stream(ctx, request, request_trailers, response, response_trailers)
    assert request.get("x-req-added") == "a"
    assert request.get("user-agent") == "replaced"
    assert request.get("x-drop") is None
    assert request_trailers.items() == [("x-rt-keep", "k"), ("x-rt-added", "1")]
    assert response.get("x-resp-added") == "r"
    assert response.get("x-replace-me") == "new"
    assert response.get("content-type") is None
    assert response.get("x-get-x-present") == "0:p"
    assert response.get("x-get-x-missing") == ("0:" if expected_abi == AbiVersion.ProxyWasm_0_1_0 else "1:")
    assert response.get("x-status-add-x-late") == "2"  # request headers are gone once responding
    assert response.get("x-keys-request_headers") == (
        "0::authority,:path,:method,:scheme,x-headers-ops,x-present,x-req-added,user-agent")
    status, size, pairs = (response.get("x-size-request_headers") or "").split(":")
    assert (status, pairs) == ("0", "8") and int(size) > 0
    assert response_trailers.items() == [("x-rtr-added", "2"), ("x-up-trailer", "changed")]


def test_headers_plugin_configuration_applies_to_every_stream() -> None:
    wasm, plugin = load("headers", b"request_headers add request_headers x-from-config c1\n"
                                   b"response_headers add response_headers x-from-config c2\n")
    for _ in range(3):
        request, response = HeaderMap([(":path", "/")]), HeaderMap([(":status", "200")])
        ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
        run_stream(ctx, request, HeaderMap(), response, HeaderMap())
        assert request.get("x-from-config") == "c1"
        assert response.get("x-from-config") == "c2"


def test_assemblyscript_plugin_reads_its_configuration() -> None:
    wasm, plugin = load("as_header", b"from-as-config")
    response = HeaderMap([(":status", "200")])
    ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
    run_stream(ctx, HeaderMap([(":path", "/")]), HeaderMap(), response, HeaderMap())
    assert response.get("x-as-header") == "from-as-config"


def test_local_reply_plugin_stops_the_stream_and_defers_the_reply() -> None:
    wasm, plugin = load("local_reply", b"phase request_headers\nstatus 418\nbody teapot\nheader x-cfg one\n"
                                       b"return continue\n")
    env = FakeStreamEnv(stream_info())
    ctx = wasm.create_stream_context(plugin, env)
    # The plugin returns Continue, but a local reply was sent: Envoy stops iteration.
    assert ctx.decode_headers(HeaderMap([(":path", "/")]), True) == FilterHeadersStatus.StopAllIterationAndWatermark
    ((kind, code, body, headers, grpc, details),) = env.actions
    assert (kind, code, body, grpc, details) == ("local_reply", 418, b"teapot", None, "wasm_local_reply")
    assert ("x-cfg", "one") in headers


def test_trap_plugin_fails_the_vm_and_later_streams_get_503() -> None:
    wasm, plugin = load("trap")
    env = FakeStreamEnv(stream_info())
    ctx = wasm.create_stream_context(plugin, env)
    status = ctx.decode_headers(HeaderMap([(":path", "/"), ("x-trap-phase", "request_headers")]), True)
    assert status == FilterHeadersStatus.StopAllIterationAndWatermark
    assert wasm.is_failed() and "unreachable" in wasm.fail_message
    assert env.actions == [("local_reply", 503, b"", [], 14, "wasm_fail_stream")]
    env2 = FakeStreamEnv(stream_info())
    ctx2 = wasm.create_stream_context(plugin, env2)
    ctx2.decode_headers(HeaderMap([(":path", "/")]), True)
    assert env2.actions == [("local_reply", 503, b"", [], 14, "wasm_fail_stream")]


def test_body_plugin_buffers_and_rewrites_the_request_body() -> None:
    from wasmproxy.http.filter import FilterDataStatus

    wasm, plugin = load("body")
    ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
    request = HeaderMap([(":path", "/"), ("x-body-ops", "request buffer;request upper;request append !")])
    ctx.decode_headers(request, False)
    assert ctx.decode_data(bytearray(b"abc"), False) == FilterDataStatus.StopIterationAndBuffer
    whole = bytearray(b"abcdef")  # the connection manager hands over the whole buffered body
    assert ctx.decode_data(whole, True) == FilterDataStatus.Continue
    assert whole == b"ABCDEF!"
    response = HeaderMap([(":status", "200")])
    ctx.encode_headers(response, True)
    assert response.get("x-body-request-sizes") == "3,6"
    assert response.get("x-body-request-eos") == "0,1"


class _Timers:
    def __init__(self) -> None:
        self.armed: dict[int, float] = {}
        self.callbacks: list = []

    def __call__(self, cb):  # type: ignore[no-untyped-def]
        timers = self

        class T:
            def enable_timer(self, ms: float) -> None:
                timers.armed[id(self)] = ms

            def disable_timer(self) -> None:
                timers.armed.pop(id(self), None)

        t = T()
        self.callbacks.append((t, cb))
        return t

    def fire_all(self) -> None:
        for t, cb in list(self.callbacks):
            if self.armed.pop(id(t), None) is not None:
                cb()


def _pause_wasm(**kwargs: object) -> tuple[Wasm, Plugin]:
    path = OUT / "pause.wasm"
    if not path.exists():
        pytest.skip("pause.wasm not built")
    wasm = Wasm(compile_module(path.read_bytes(), name="pause"), vm_id="test_pause", **kwargs)  # type: ignore[arg-type]
    assert wasm.initialize(), wasm.fail_message
    plugin = Plugin(name="pause", vm_id="test_pause")
    root = wasm.start(plugin)
    assert root is not None and wasm.configure(root, plugin)
    return wasm, plugin


def test_pause_plugin_resumes_from_a_tick_through_the_effective_context() -> None:
    timers = _Timers()
    wasm, plugin = _pause_wasm(post=lambda cb: None, timer_factory=timers)
    env = FakeStreamEnv(stream_info())
    ctx = wasm.create_stream_context(plugin, env)
    request = HeaderMap([(":path", "/"), ("x-pause-request", "tick")])
    assert ctx.decode_headers(request, True) == FilterHeadersStatus.StopAllIterationAndWatermark
    assert env.actions == []
    timers.fire_all()  # proxy_on_tick on the root: it continues the paused stream
    assert [a for a in env.actions if a[0] == "continue"] == [("continue", 0)]
    assert request.get("x-resumed-by") == "tick"


def test_pause_plugin_resumes_from_a_queue_item_posted_to_the_owner() -> None:
    posted: list = []
    wasm, plugin = _pause_wasm(post=posted.append)
    waiting_env = FakeStreamEnv(stream_info())
    waiting = wasm.create_stream_context(plugin, waiting_env)
    request = HeaderMap([(":path", "/"), ("x-pause-request", "queue")])
    assert waiting.decode_headers(request, True) == FilterHeadersStatus.StopAllIterationAndWatermark
    other = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
    assert other.decode_headers(HeaderMap([(":path", "/"), ("x-pause-enqueue", "it")]), True) == \
        FilterHeadersStatus.Continue
    assert waiting_env.actions == []
    for cb in posted:  # the owner's thread drains its posts: proxy_on_queue_ready
        cb()
    assert [a for a in waiting_env.actions if a[0] == "continue"] == [("continue", 0)]
    assert (request.get("x-resumed-by"), request.get("x-queue-item")) == ("queue", "it")


def test_pause_plugin_resumes_from_an_http_call_response() -> None:
    from tests.wasm_host.fakes import FakeWasmEnv

    env_wasm = FakeWasmEnv()
    wasm, plugin = _pause_wasm(post=lambda cb: None, environment=env_wasm)
    # FakeWasmEnv only knows the cluster "known": an unknown cluster fails at once.
    env = FakeStreamEnv(stream_info())
    ctx = wasm.create_stream_context(plugin, env)
    request = HeaderMap([(":path", "/"), ("x-pause-request", "http_call")])
    assert ctx.decode_headers(request, True) == FilterHeadersStatus.Continue
    assert request.get("x-http-call-status") == "2"


def test_pause_plugin_resumes_when_the_callout_answers() -> None:
    from tests.wasm_host.fakes import FakeWasmEnv

    path = OUT / "pause.wasm"
    if not path.exists():
        pytest.skip("pause.wasm not built")
    env_wasm = FakeWasmEnv()
    wasm = Wasm(compile_module(path.read_bytes(), name="pause"), vm_id="test_pause2", post=lambda cb: None,
                environment=env_wasm)
    assert wasm.initialize()
    plugin = Plugin(name="pause", vm_id="test_pause2", plugin_configuration=b"cluster known\n")
    root = wasm.start(plugin)
    assert root is not None and wasm.configure(root, plugin)
    env = FakeStreamEnv(stream_info())
    ctx = wasm.create_stream_context(plugin, env)
    request = HeaderMap([(":path", "/"), ("x-pause-request", "http_call")])
    assert ctx.decode_headers(request, True) == FilterHeadersStatus.StopAllIterationAndWatermark
    ((kind, context, token, headers, body, trailers, timeout),) = env_wasm.calls
    assert context is root and (":path", "/callout") in headers
    root.on_http_call_success(token, HeaderMap([(":status", "200")]), b"callout-body", None)
    assert [a for a in env.actions if a[0] == "continue"] == [("continue", 0)]
    assert request.get("x-resumed-by") == "http_call"
    assert (request.get("x-callout-status"), request.get("x-callout-body")) == ("200", "callout-body")


def test_bad_pointers_get_invalid_memory_access_and_the_vm_survives() -> None:
    wasm, plugin = load("wat_bad_pointers")
    for _ in range(2):
        ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
        ctx.decode_headers(HeaderMap([(":path", "/")]), True)
        response = HeaderMap([(":status", "200")])
        assert ctx.encode_headers(response, True) == FilterHeadersStatus.Continue
        for name in ("log", "log-len", "get-key", "get-out", "add-value", "property", "time", "shared-key",
                     "metric-name"):
            assert response.get(f"x-bad-{name}") == "6", name
        assert response.get("x-bad-fd-write") == "21"
        ctx.on_destroy()
    assert not wasm.is_failed()


def test_trap_message_names_the_callback_as_envoy_logs_it() -> None:
    wasm, plugin = load("trap")
    ctx = wasm.create_stream_context(plugin, FakeStreamEnv(stream_info()))
    ctx.decode_headers(HeaderMap([(":path", "/"), ("x-trap-phase", "request_headers")]), True)
    assert "Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable" in wasm.fail_message


def test_abi_all_statuses_match_real_envoy() -> None:
    """Every host function's status, as abi_all reports it, equals what Envoy 1.40 answered."""
    from tests.wasm_host.fakes import FakeWasmEnv
    from wasmproxy.wasm.abi import WasmResult

    class Env(FakeWasmEnv):  # Envoy's answers for a known ("echo") and an unknown cluster
        def http_call(self, context, token, cluster, headers, body, trailers, timeout_ms):  # type: ignore[no-untyped-def]
            return WasmResult.Ok if cluster == "echo" else WasmResult.BadArgument

        def grpc_call(self, context, token, service, *rest):  # type: ignore[no-untyped-def]
            return WasmResult.Ok if service == b"echo" else WasmResult.ParseFailure

        def grpc_stream(self, context, token, service, *rest):  # type: ignore[no-untyped-def]
            return WasmResult.Ok if service == b"echo" else WasmResult.ParseFailure

    path = OUT / "abi_all.wasm"
    if not path.exists():
        pytest.skip("abi_all.wasm not built")
    reference = {}
    for line in (Path(__file__).parent / "wasm_host" / "envoy_1_40_abi_all.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(": ")
            reference[name] = value
    wasm = Wasm(compile_module(path.read_bytes(), name="abi_all"), post=lambda cb: None, vm_id="pvm",
                vm_configuration=b"vmcfg", environment=Env())
    assert wasm.initialize()
    plugin = Plugin(name="pname", root_id="proot", vm_id="pvm", plugin_configuration=b"plugin-config")
    root = wasm.start(plugin)
    assert root is not None and wasm.configure(root, plugin)
    info = stream_info()
    ctx = wasm.create_stream_context(plugin, FakeStreamEnv(info))
    ctx.decode_headers(HeaderMap([(":authority", "127.0.0.1:1"), (":path", "/"), (":method", "GET"),
                                  (":scheme", "http"), ("user-agent", "curl/7.88.1"), ("accept", "*/*"),
                                  ("x-forwarded-proto", "http"), ("x-request-id", "abc")]), True)
    info.response_code = 200
    response = HeaderMap([(":status", "200"), ("content-length", "2"), ("content-type", "text/plain")])
    ctx.encode_headers(response, False)
    ours = {k: v for k, v in response.items() if k.startswith("x-abi")}
    common = set(ours) & set(reference)
    assert len(common) >= 60  # the plugin may have grown since the reference was taken
    assert {k: ours[k] for k in common} == {k: reference[k] for k in common}
