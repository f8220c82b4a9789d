"""The Wasm network filter bridge, socket-free: the tcp_filter plugin over a FilterManager."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2

from wasm_filter_support import factory_context, plugin_config
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo
from wasmproxy.network.filter import ConnectionCloseType, ConnectionEvent, FilterStatus
from wasmproxy.network.filter_manager import FilterManager
from wasmproxy.wasm.abi import FailState
from wasmproxy.wasm.network_filter import create_wasm_network_filter_factory

CONFIG = "prefix [p]\nmagic QUIT\nhold HOLD\nupper"


class FakeConnection:
    """The Connection surface the bridge and FilterManager use; a terminal filter drains reads."""

    def __init__(self) -> None:
        self.read_buffer = bytearray()
        self.read_end_stream = False
        self.is_open = True
        self.closed_with: ConnectionCloseType | None = None
        self.callbacks: list[Any] = []
        self.stream_info = StreamInfo(ConnectionInfo(1, Address("127.0.0.1", 80), Address("127.0.0.1", 5000)))

    def add_connection_callbacks(self, cb: Any) -> None:
        self.callbacks.append(cb)

    def close(self, close_type: ConnectionCloseType) -> None:
        if self.is_open:
            self.is_open = False
            self.closed_with = close_type
            for cb in self.callbacks:
                cb.on_event(ConnectionEvent.LocalClose)


class Terminal:
    """Stands in for tcp_proxy: records what reaches it and drains the read buffer."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bool]] = []

    def initialize_read_filter_callbacks(self, callbacks: Any) -> None:
        pass

    def on_new_connection(self) -> FilterStatus:
        return FilterStatus.Continue

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        self.received.append((bytes(data), end_stream))
        data.clear()
        return FilterStatus.StopIteration


def _setup(configuration: str = CONFIG, **kw: Any) -> tuple[Any, FakeConnection, FilterManager, Terminal, Any]:
    context = factory_context()
    proto = network_wasm_pb2.Wasm(config=plugin_config("tcp_filter", configuration, **kw))
    factory = create_wasm_network_filter_factory(proto, context)
    conn = FakeConnection()
    fm = FilterManager(conn)  # type: ignore[arg-type]
    factory(fm)
    terminal = Terminal()
    fm.add_read_filter(terminal)
    return context, conn, fm, terminal, factory


def _read(conn: FakeConnection, fm: FilterManager, data: bytes, end_stream: bool = False) -> None:
    conn.read_buffer += data
    conn.read_end_stream = end_stream
    fm.on_read()


def _counter(context: Any, name: str) -> int:
    return context.main_store.counter(f"wasmcustom.tcp_filter.{name}").value


def test_downstream_data_is_rewritten_held_and_released_as_the_plugin_says() -> None:
    context, conn, fm, terminal, _ = _setup()
    fm.initialize_read_filters()
    _read(conn, fm, b"hello")
    _read(conn, fm, b"HOLD1")  # StopIteration: stays in the read buffer
    assert terminal.received == [(b"[p]hello", False)]
    assert conn.read_buffer == b"HOLD1"
    _read(conn, fm, b"release", end_stream=True)  # the plugin sees everything held so far
    assert terminal.received[1] == (b"HOLD1release", True)
    assert _counter(context, "downstream_bytes") == 5 + 5 + 12


def test_upstream_data_is_rewritten_on_write_and_end_of_stream_reports_upstream_close() -> None:
    context, conn, fm, _, _ = _setup()
    fm.initialize_read_filters()
    data = bytearray(b"abc")
    assert fm.on_write(data, False) == FilterStatus.Continue
    assert data == b"ABC"
    assert _counter(context, "upstream_close") == 0
    fm.on_write(bytearray(), True)
    assert _counter(context, "upstream_close") == 1


def test_magic_word_closes_the_connection_and_the_plugin_sees_the_close_then_log() -> None:
    context, conn, fm, terminal, _ = _setup()
    fm.initialize_read_filters()
    _read(conn, fm, b"please QUIT")
    assert conn.closed_with == ConnectionCloseType.FlushWrite
    assert terminal.received == []
    assert _counter(context, "downstream_close") == 1
    assert _counter(context, "logs") == 1


def test_one_stream_context_per_connection() -> None:
    context, conn, fm, _, factory = _setup()
    fm.initialize_read_filters()
    other = FilterManager(FakeConnection())  # type: ignore[arg-type]
    factory(other)
    other.add_read_filter(Terminal())
    other.initialize_read_filters()
    assert _counter(context, "connections") == 2


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_failed_vm_closes_the_connection_unless_fail_open(fail_open: bool) -> None:
    context, conn, fm, terminal, _ = _setup(fail_open=fail_open)
    fm.initialize_read_filters()
    wasm = fm._read[0].filter.context.wasm  # the bridge's stream context
    wasm.fail(FailState.RuntimeError, "test")
    _read(conn, fm, b"x")
    if fail_open:
        assert conn.is_open and terminal.received == [(b"x", False)]
    else:
        assert conn.closed_with == ConnectionCloseType.FlushWrite and terminal.received == []


def test_fail_open_policy_with_a_failed_vm_leaves_the_filter_out() -> None:
    context, conn, fm, terminal, factory = _setup(failure_policy="FAIL_OPEN")
    fm.initialize_read_filters()
    fm._read[0].filter.context.wasm.fail(FailState.RuntimeError, "test")
    later = FilterManager(FakeConnection())  # type: ignore[arg-type]
    factory(later)
    assert later._read == []


def test_continue_stream_downstream_resumes_reading_after_the_filter() -> None:
    from wasmproxy.wasm.abi import WasmStreamType

    context, conn, fm, terminal, _ = _setup()
    fm.initialize_read_filters()
    _read(conn, fm, b"HOLD2")
    assert terminal.received == []
    wasm_filter = fm._read[0].filter
    wasm_filter.continue_stream(WasmStreamType.Downstream)  # what proxy_continue_stream(DOWNSTREAM) does
    assert terminal.received == [(b"HOLD2", False)]
