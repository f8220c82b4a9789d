"""Envoy's ABI additions, the same plugin and YAML on real Envoy 1.40 and on wasmproxy:
envoy_resolve_dns / envoy_on_resolve_dns (token, CallData format, inline answers), the foreign
functions declare_property and set_envoy_filter_state, and foreign-function error codes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from envoy_plugins.envoy_harness import EnvoyRun, Listener, Response, plugin, selected_proxies, wasm_filter

pytestmark = pytest.mark.envoy

# Declared in on_configure: "ro" readonly bytes, "rw" string, "ro" again (BadArgument).
CONFIG = "declare ro 1 0\ndeclare rw 0 1\ndeclare ro 0 0\n"


@pytest.fixture(scope="module", params=selected_proxies())
def run(request: pytest.FixtureRequest) -> Iterator[EnvoyRun]:
    wasm = wasm_filter(plugin("envoy_extras"), CONFIG, vm_id="extras_vm", root_id="extras_root", name="extras")
    with EnvoyRun([Listener("extras", [wasm])], proxy=str(request.param)) as r:
        yield r


def _ask(run: EnvoyRun, **headers: str) -> Response:
    r = run.request("extras", headers={k.replace("_", "-"): v for k, v in headers.items()})
    assert r.status == 200, r.body
    assert r.header("x-declare") == "0,0,2"  # a second declaration of a name is BadArgument
    return r


def test_a_readonly_declared_property_is_set_once(run: EnvoyRun) -> None:
    r = _ask(run, x_set="ro=a,ro=b,rw=c,rw=d,plain=e,plain=f", x_get="ro,rw,plain")
    assert r.body.decode().splitlines() == [
        "set ro=0", "set ro=2", "set rw=0", "set rw=0", "set plain=0", "set plain=0",
        "get ro=0:a", "get rw=0:d", "get plain=0:f"]


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("envoy.network.upstream_server_name", "foo.example", ["fs=0", "get filter_state=0:foo.example"]),
    ("envoy.tcp_proxy.cluster", "echo", ["fs=0", "get filter_state=0:echo"]),
    ("envoy.string", "a,b", ["fs=0", "get filter_state=0:a,b"]),
    ("envoy.network.ip", "1.2.3.4", ["fs=0", "get filter_state=0:1.2.3.4:0"]),
    ("envoy.network.ip", "1.2.3.4:80", ["fs=2", "get filter_state=1:"]),
    ("envoy.tcp_proxy.disable_tunneling", "yes", ["fs=0", "get filter_state=0:false"]),
    ("envoy.network.application_protocols", "h2,http/1.1", ["fs=0", "get filter_state=1:"]),
    ("envoy.network.transport_socket.original_dst_address", "1.2.3.4:80", ["fs=0", "get filter_state=0:"]),
    ("envoy.ratelimit.hits_addend", "x", ["fs=2", "get filter_state=1:"]),
    ("envoy.unknown.key", "1", ["fs=1", "get filter_state=1:"]),
])
def test_set_envoy_filter_state(run: EnvoyRun, key: str, value: str, expected: list[str]) -> None:
    lines = _ask(run, x_fs=f"{key}={value}").body.decode().splitlines()
    assert [line.replace(f"fs {key}=", "fs=") for line in lines] == expected


@pytest.mark.parametrize(("name", "status"), [
    ("set_envoy_filter_state", 2), ("declare_property", 2),  # arguments that do not parse
    ("no_such_function", 1), ("compress", 0),
])
def test_foreign_function_status(run: EnvoyRun, name: str, status: int) -> None:
    assert _ask(run, x_foreign=name).body.decode() == f"foreign {name}={status}\n"


@pytest.mark.parametrize(("name", "answer"), [
    ("127.0.0.1", "inline=1 size=20 count=1\n0 127.0.0.1:0\n"),
    ("::1", "inline=1 size=16 count=1\n0 [::1]:0\n"),
    ("localhost", "inline=1 size=16 count=1\n0 [::1]:0\n"),  # Auto: the IPv6 answer
    ("", "inline=0 size=4 count=0\n"),  # a completed lookup with no addresses, answered later
])
def test_resolve_dns(run: EnvoyRun, name: str, answer: str) -> None:
    body = _ask(run, x_dns=name).body.decode()
    head, _, rest = body.partition(" inline=")
    assert head.startswith("dns=0 token=") and int(head.removeprefix("dns=0 token=")) >= 2
    assert "inline=" + rest == answer


def test_a_property_declared_by_a_stream_does_not_govern_its_sets(run: EnvoyRun) -> None:
    # Envoy keeps the declaration on the calling context; set_property consults the root's.
    r = _ask(run, x_declare_here="streamprop", x_set="streamprop=1,streamprop=2", x_get="streamprop")
    assert r.body.decode().splitlines() == [
        "declare streamprop=0", "set streamprop=0", "set streamprop=0", "get streamprop=0:2"]
