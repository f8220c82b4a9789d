"""The network filter manager (Envoy's Network::FilterManagerImpl) and the L4 Connection."""

from __future__ import annotations

import socket
import threading
from typing import Any

from wasmproxy.event.dispatcher import Dispatcher
from wasmproxy.network.filter import FilterStatus
from wasmproxy.network.filter_manager import FilterManager
from wasmproxy.network.listener import ConnectionHandler, worker_handler_factory

CONTINUE, STOP = FilterStatus.Continue, FilterStatus.StopIteration


class FakeConnection:
    def __init__(self) -> None:
        self.read_buffer = bytearray()
        self.read_end_stream = False
        self.is_open = True


class Recorder:
    """A read+write filter that records calls and answers from scripted statuses."""

    def __init__(self, name: str, log: list[Any], new: FilterStatus = CONTINUE, data: FilterStatus = CONTINUE,
                 write: FilterStatus = CONTINUE, drain: bool = False) -> None:
        self.name, self.log, self.new, self.data, self.write, self.drain = name, log, new, data, write, drain
        self.callbacks: Any = None

    def initialize_read_filter_callbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def initialize_write_filter_callbacks(self, callbacks: Any) -> None:
        pass

    def on_new_connection(self) -> FilterStatus:
        self.log.append((self.name, "new"))
        return self.new

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        self.log.append((self.name, bytes(data), end_stream))
        if self.drain:
            data.clear()
        return self.data

    def on_write(self, data: bytearray, end_stream: bool) -> FilterStatus:
        self.log.append((self.name, "write", bytes(data), end_stream))
        return self.write


def test_read_filters_run_in_order_and_stop_iteration_waits_for_continue_reading() -> None:
    conn, log = FakeConnection(), []
    fm = FilterManager(conn)  # type: ignore[arg-type]
    a = Recorder("a", log, new=STOP)
    b = Recorder("b", log, drain=True)
    fm.add_read_filter(a)
    fm.add_read_filter(b)
    assert fm.initialize_read_filters()
    assert log == [("a", "new")]  # b is not initialized while a holds the chain
    conn.read_buffer += b"xy"
    a.new = CONTINUE
    a.callbacks.continue_reading()  # resumes after a: b is initialized, then sees the buffer
    assert log[1:] == [("b", "new"), ("b", b"xy", False)]
    assert conn.read_buffer == b""


def test_data_left_in_the_read_buffer_is_seen_again_with_later_bytes() -> None:
    conn, log = FakeConnection(), []
    fm = FilterManager(conn)  # type: ignore[arg-type]
    holder = Recorder("h", log, data=STOP)
    fm.add_read_filter(holder)
    fm.add_read_filter(Recorder("t", log, drain=True))
    fm.initialize_read_filters()
    conn.read_buffer += b"ab"
    fm.on_read()
    conn.read_buffer += b"cd"
    conn.read_end_stream = True
    holder.data = CONTINUE
    fm.on_read()
    assert [e for e in log if e[1] != "new"] == [("h", b"ab", False), ("h", b"abcd", True), ("t", b"abcd", True)]


def test_a_closed_connection_stops_the_read_chain() -> None:
    conn, log = FakeConnection(), []
    fm = FilterManager(conn)  # type: ignore[arg-type]
    first = Recorder("a", log)
    fm.add_read_filter(first)
    fm.add_read_filter(Recorder("b", log))
    conn.read_buffer += b"x"

    def close_on_data(data: bytearray, end_stream: bool) -> FilterStatus:
        conn.is_open = False
        return CONTINUE

    first.on_data = close_on_data  # type: ignore[method-assign]
    fm.initialize_read_filters()
    assert ("b", "new") not in log


def test_write_filters_run_last_added_first_and_stop_iteration_holds_the_data() -> None:
    conn, log = FakeConnection(), []
    fm = FilterManager(conn)  # type: ignore[arg-type]
    fm.add_write_filter(Recorder("first", log))
    fm.add_write_filter(Recorder("second", log, write=STOP))
    assert fm.on_write(bytearray(b"z"), True) == STOP
    assert log == [("second", "write", b"z", True)]


def test_hcm_alone_keeps_its_own_protocol_factory() -> None:
    class Hcm:
        def for_worker(self, dispatcher: Any, store: Any) -> str:
            return "hcm-handler"

    assert worker_handler_factory([Hcm()], "l")(None, None) == "hcm-handler"  # type: ignore[arg-type]
    handler = worker_handler_factory([lambda fm: None], "l")(None, None)  # type: ignore[arg-type]
    assert isinstance(handler, ConnectionHandler)


class HalfCloseEcho:
    """Terminal read filter: echoes through connection.write, half-close on, reads disabled until
    a timer fires (as tcp_proxy while it connects)."""

    def __init__(self, dispatcher: Dispatcher, log: list[Any]) -> None:
        self.dispatcher, self.log = dispatcher, log

    def initialize_read_filter_callbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks
        callbacks.connection.enable_half_close(True)
        callbacks.connection.add_connection_callbacks(self)

    def on_new_connection(self) -> FilterStatus:
        self.callbacks.connection.read_disable(True)
        self.timer = self.dispatcher.create_timer(self._enable)
        self.timer.enable_timer(50)
        return STOP

    def _enable(self) -> None:
        self.callbacks.connection.read_disable(False)
        self.callbacks.continue_reading()

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        self.log.append((bytes(data), end_stream))
        self.callbacks.connection.write(bytearray(data.upper()), end_stream)
        data.clear()
        return STOP

    def on_event(self, event: Any) -> None:
        self.log.append(event.name)

    def on_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_below_write_buffer_low_watermark(self) -> None:
        pass


def test_connection_half_close_and_bytes_held_while_reading_is_disabled() -> None:
    dispatcher = Dispatcher("net-test")
    log: list[Any] = []
    handler = ConnectionHandler([lambda fm: fm.add_read_filter(HalfCloseEcho(dispatcher, log))], dispatcher,
                                "l", 1 << 20)
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    got: list[bytes] = []

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"hello")
                c.shutdown(socket.SHUT_WR)  # our FIN; the proxy side may still write
                while chunk := c.recv(100):
                    got.append(chunk)
        finally:
            dispatcher.post(dispatcher.exit)

    dispatcher.post(lambda: dispatcher.loop.create_task(dispatcher.loop.create_server(handler, sock=server)))
    thread = threading.Thread(target=client)
    thread.start()
    dispatcher.run()
    thread.join(5)
    server.close()
    assert b"".join(got) == b"HELLO"
    # The bytes and the FIN that came while reading was disabled arrive once it is enabled;
    # both directions ended, so the socket closes from our side after the last write.
    assert log[-1] == "LocalClose"
    assert b"".join(d for d, _ in log[:-1]) == b"hello" and log[-2][1] is True
