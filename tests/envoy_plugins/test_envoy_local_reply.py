"""Real Envoy 1.40 with the local_reply plugin: proxy_send_local_response from each phase."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    configured = "phase request_headers\nstatus 418\nbody teapot\nheader x-cfg one\ndetails cfg_details"
    listeners = [
        Listener("by_header", [wasm_filter(plugin("local_reply"), "")]),
        # Same VM (same code, vm_id and VM config): each plugin keeps its own settings.
        Listener("configured", [wasm_filter(plugin("local_reply"), configured)]),
        # props first: its encoder runs on the local reply sent by the filter after it.
        Listener("details", [wasm_filter(plugin("props"), vm_id="props"),
                             wasm_filter(plugin("local_reply"), "phase request_headers\nstatus 418", vm_id="lr")]),
    ]
    with EnvoyRun(listeners, proxy=proxy) as run:
        yield run


def _reply_headers(phase: str, ret: str = "stop") -> dict[str, str]:
    return {"x-local-reply-phase": phase, "x-local-reply-status": "401", "x-local-reply-body": "nope",
            "x-local-reply-headers": "x-a=1,x-b=2", "x-local-reply-return": ret}


def test_configured_reply(envoy: EnvoyRun) -> None:
    seen = envoy.echo.requests_seen
    r = envoy.request("configured")
    assert (r.status, r.body) == (418, b"teapot")
    assert r.header("x-cfg") == "one"
    assert r.header("content-type") == "text/plain"
    assert r.header("content-length") == "6"
    assert envoy.echo.requests_seen == seen


def test_plugins_sharing_a_vm_keep_their_own_configuration(envoy: EnvoyRun) -> None:
    r = envoy.request("by_header")
    assert r.status == 200 and r.header("x-cfg") is None and r.echo()["method"] == "GET"


@pytest.mark.parametrize("ret", ["stop", "continue"])
@pytest.mark.parametrize("phase", ["request_headers", "request_body", "response_headers"])
def test_reply_replaces_the_response(envoy: EnvoyRun, phase: str, ret: str) -> None:
    r = envoy.request("by_header", "POST", body=b"hello", headers=_reply_headers(phase, ret))
    assert (r.status, r.body) == (401, b"nope")
    assert (r.header("x-a"), r.header("x-b")) == ("1", "2")
    assert r.header("content-type") == "text/plain"
    assert r.header("x-envoy-upstream-service-time") is None
    # The request body was not read when the reply came from the request headers: Envoy closes.
    assert r.header("connection") == ("close" if phase == "request_headers" else None)


def test_reply_from_request_headers_never_reaches_upstream(envoy: EnvoyRun) -> None:
    seen = envoy.echo.requests_seen
    r = envoy.request("by_header", headers=_reply_headers("request_headers"))
    assert r.status == 401
    assert envoy.echo.requests_seen == seen


def test_reply_from_chunked_request_body_defaults_to_403(envoy: EnvoyRun) -> None:
    r = envoy.request("by_header", "POST", body=[b"a", b"b"], headers={"x-local-reply-phase": "request_body"})
    assert (r.status, r.body, r.header("content-length")) == (403, b"", "0")


def test_reply_after_response_headers_were_sent_resets_the_stream(envoy: EnvoyRun) -> None:
    r = envoy.request("by_header", "POST", body=b"hello", headers=_reply_headers("response_body"))
    # The upstream's headers already went downstream: Envoy cannot replace them and resets.
    assert r.status == 200
    assert r.header("content-type") == "application/json"
    assert len(r.body) < int(r.header("content-length") or 0)


def test_grpc_status_is_ignored_for_plain_http(envoy: EnvoyRun) -> None:
    r = envoy.request("by_header", headers={"x-local-reply-phase": "request_headers", "x-local-reply-status": "200",
                                            "x-local-reply-grpc-status": "7"})
    assert (r.status, r.body) == (200, b"")
    assert r.header("grpc-status") is None


@pytest.mark.parametrize(("details", "seen"), [(None, "wasm_local_reply"), ("my_details", "my_details"),
                                               ("has space", "has_space")])
def test_response_code_details(envoy: EnvoyRun, details: str | None, seen: str) -> None:
    headers = {"x-props-get-response": "response.code_details,response.flags"}
    if details is not None:
        headers["x-local-reply-details"] = details
    r = envoy.request("details", headers=headers)
    assert r.status == 418
    # Envoy makes details a single token; no response flag is set for a plugin's reply.
    assert r.header("x-prop-response.code_details") == f"0:{seen}"
    assert r.header("x-prop-response.flags") == "0:hex:" + "00" * 8
