"""Envoy's ABI additions without sockets: envoy_resolve_dns (token, inline answers, the thread
path), declare_property + set_property, set_envoy_filter_state. The same behaviours are pinned
against real Envoy 1.40 in test_wasm_envoy_extras.py."""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Callable

from tests.wasm_host.fakes import FakeStreamEnv, stream_info
from tests.wasm_host.guest import Guest
from wasmproxy.wasm import dns
from wasmproxy.wasm.abi import WasmBufferType, WasmResult
from wasmproxy.wasm.context import ContextBase, WasmEnvironment
from wasmproxy.wasm.plugin import ProxyWasmEnvironment

OK, NOT_FOUND, BAD_ARG = 0, 1, 2
OUT, KEY, VAL = 2048, 4096, 8192


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _field(number: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _stream(g: Guest) -> ContextBase:
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.on_create()
    return ctx


def _foreign(g: Guest, ctx: ContextBase | None, name: bytes, args: bytes) -> int:
    n, nn = g.put(name, KEY)
    a, an = g.put(args, VAL)
    return g.call(ctx, "proxy_call_foreign_function", n, nn, a, an, OUT, OUT + 4)


def _set(g: Guest, ctx: ContextBase, name: bytes, value: bytes) -> int:
    p, pn = g.put(name, KEY)
    v, vn = g.put(value, VAL)
    return g.call(ctx, "proxy_set_property", p, pn, v, vn)


def _get(g: Guest, ctx: ContextBase, path: bytes) -> tuple[int, bytes]:
    p, pn = g.put(path, KEY)
    rc = g.call(ctx, "proxy_get_property", p, pn, OUT, OUT + 4)
    return rc, g.out_bytes(OUT, OUT + 4) if rc == OK else b""


# -- DNS -----------------------------------------------------------------------------------------


def test_inline_answers_are_literals_hosts_entries_and_localhost(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.1 both # comment\nfe80::1 both\n10.0.0.2 v4only alias\n")
    assert dns.resolve_inline("127.0.0.1", str(hosts)) == [("127.0.0.1:0", 0)]
    assert dns.resolve_inline("0:0::1", str(hosts)) == [("[::1]:0", 0)]
    assert dns.resolve_inline("both", str(hosts)) == [("[fe80::1]:0", 0)]  # Auto: IPv6 when there is some
    assert dns.resolve_inline("ALIAS", str(hosts)) == [("10.0.0.2:0", 0)]
    assert dns.resolve_inline("localhost", str(hosts)) == [("[::1]:0", 0)]  # c-ares's own localhost
    assert dns.resolve_inline("example.invalid", str(hosts)) is None
    assert dns.resolve_inline("", str(hosts)) is None


def test_other_names_resolve_on_a_thread_and_are_posted() -> None:
    posted = threading.Event()
    queue: list[Callable[[], None]] = []
    got: list[object] = []

    def post(fn: Callable[[], None]) -> None:
        queue.append(fn)
        posted.set()

    dns.resolve("", post, got.append)  # an empty name: a completed lookup with no addresses
    assert got == []  # nothing inline
    assert posted.wait(10)
    queue.pop()()
    assert got == [[]]


class _RecordingEnv(WasmEnvironment):
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def resolve_dns(self, context: ContextBase, token: int, address: str) -> WasmResult:
        self.calls.append((token, address))
        return WasmResult.Ok


def test_tokens_start_at_two_and_are_written_before_resolving() -> None:
    env = _RecordingEnv()
    g = Guest(environment=env)
    a, an = g.put(b"host", KEY)
    assert g.call(None, "envoy_resolve_dns", a, an, OUT) == OK
    assert g.u32(OUT) == 2  # Envoy's dns_token_ starts at 1 and is incremented first
    assert g.call(None, "envoy_resolve_dns", a, an, OUT) == OK
    assert env.calls == [(2, "host"), (3, "host")]


def test_an_inline_answer_reaches_the_root_inside_the_call_in_envoys_format() -> None:
    env = ProxyWasmEnvironment(lambda: None, None, post=lambda fn: fn())
    g = Guest(environment=env)
    got: list[tuple[int, int, int, bytes]] = []
    g.handlers["envoy_on_resolve_dns"] = lambda root, token, size: got.append(
        (root, token, size, g.out_bytes(OUT + 16, OUT + 20)
         if g.hostcall("proxy_get_buffer_bytes", WasmBufferType.CallData, 0, size, OUT + 16, OUT + 20) == OK
         else b"")) or 0
    stream = _stream(g)
    a, an = g.put(b"::1", KEY)
    assert g.call(stream, "envoy_resolve_dns", a, an, OUT) == OK
    assert g.root is not None
    data = struct.pack("<II", 1, 0) + b"[::1]:0\0"
    assert got == [(g.root.id, 2, len(data), data)]  # on the root context, before the call returned


def test_no_addresses_is_a_count_of_zero_and_a_failure_an_empty_buffer() -> None:
    g = Guest()
    sizes: list[int] = []
    g.handlers["envoy_on_resolve_dns"] = lambda root, token, size: sizes.append(size) or 0
    assert g.root is not None
    g.root.on_resolve_dns(2, [])
    g.root.on_resolve_dns(3, None)
    assert sizes == [4, 0]


# -- declare_property / set_envoy_filter_state ----------------------------------------------------


def test_a_readonly_declared_property_is_set_once() -> None:
    g = Guest()
    declare_ro = _field(1, b"ro") + _field(2, 1)
    assert _foreign(g, None, b"declare_property", declare_ro) == OK
    assert _foreign(g, None, b"declare_property", _field(1, b"ro")) == BAD_ARG  # already declared
    assert _foreign(g, None, b"declare_property", _field(1, b"rw") + _field(3, 1)) == OK
    ctx = _stream(g)
    assert [_set(g, ctx, b"ro", b"a"), _set(g, ctx, b"ro", b"b")] == [OK, BAD_ARG]
    assert [_set(g, ctx, b"rw", b"c"), _set(g, ctx, b"rw", b"d")] == [OK, OK]
    assert _get(g, ctx, b"ro") == (OK, b"a")
    assert _get(g, ctx, b"rw") == (OK, b"d")


def test_a_property_declared_by_a_stream_context_does_not_govern_sets() -> None:
    g = Guest()
    ctx = _stream(g)
    assert _foreign(g, ctx, b"declare_property", _field(1, b"p") + _field(2, 1)) == OK  # Envoy: on the caller
    assert [_set(g, ctx, b"p", b"1"), _set(g, ctx, b"p", b"2")] == [OK, OK]  # sets read the root's


def test_malformed_arguments_are_bad_arguments() -> None:
    g = Guest()
    for name in (b"declare_property", b"set_envoy_filter_state"):
        assert _foreign(g, None, name, b"\xff") == BAD_ARG  # a truncated varint
        assert _foreign(g, None, name, _field(1, b"\xff\xfe")) == BAD_ARG  # a string that is not UTF-8


def test_set_envoy_filter_state_uses_the_object_factories() -> None:
    g = Guest()
    ctx = _stream(g)

    def fs(key: bytes, value: bytes) -> tuple[int, tuple[int, bytes]]:
        rc = _foreign(g, ctx, b"set_envoy_filter_state", _field(1, key) + _field(2, value))
        return rc, _get(g, ctx, b"filter_state\0" + key)

    assert fs(b"envoy.network.upstream_server_name", b"foo.example") == (OK, (OK, b"foo.example"))
    assert fs(b"envoy.unknown.key", b"1") == (NOT_FOUND, (NOT_FOUND, b""))
    assert fs(b"envoy.network.ip", b"1.2.3.4") == (OK, (OK, b"1.2.3.4:0"))
    assert fs(b"envoy.network.ip", b"nope") == (BAD_ARG, (OK, b"1.2.3.4:0"))  # the old object stays
    assert fs(b"envoy.tcp_proxy.disable_tunneling", b"yes") == (OK, (OK, b"false"))
    assert fs(b"envoy.network.application_protocols", b"h2") == (OK, (NOT_FOUND, b""))  # no string form
    assert _foreign(g, None, b"set_envoy_filter_state",
                    _field(1, b"envoy.string") + _field(2, b"x")) == NOT_FOUND  # a root has no stream
