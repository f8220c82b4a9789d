"""The overload manager's global_downstream_max_connections monitor (wasmproxy/overload.py):
the process-wide count, its configuration, and the accept-time check on both listener paths
(HCM alone, and a network filter chain). The over-limit behaviour against real Envoy is
tests/test_hostile_clients.py::test_global_downstream_max_connections."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from wasmproxy.config import ConfigError, load_bootstrap_text
from wasmproxy.event.dispatcher import Dispatcher
from wasmproxy.http.conn_manager import HttpConnectionManagerConfig, WorkerConnectionHandler
from wasmproxy.http.filter import FilterHeadersStatus, PassThroughFilter
from wasmproxy.network.filter import FilterStatus
from wasmproxy.network.listener import worker_handler_factory
from wasmproxy.overload import DownstreamConnectionLimit, downstream_connection_limit
from wasmproxy.stats.store import Store

MONITOR = """
overload_manager:
  resource_monitors:
    - name: {name}
      typed_config:
        "@type": type.googleapis.com/{type}
        {field}
"""
DOWNSTREAM = dict(name="envoy.resource_monitors.global_downstream_max_connections",
                  type="envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                  field="max_active_downstream_connections: 3")
HEAP = dict(name="envoy.resource_monitors.fixed_heap",
            type="envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
            field="max_heap_size_bytes: 1000000")
OVERFLOW = "listener.127.0.0.1_{port}.downstream_global_cx_overflow"


# --- the count ---------------------------------------------------------------------------------

def test_limit_admits_up_to_the_maximum_and_again_after_a_release() -> None:
    limit = DownstreamConnectionLimit(2)
    assert [limit.try_allocate() for _ in range(3)] == [True, True, False]
    assert limit.active == 2
    limit.release()
    assert limit.try_allocate() and not limit.try_allocate()


def test_limit_is_exact_across_threads() -> None:
    limit = DownstreamConnectionLimit(1000)
    admitted: list[int] = []

    def grab() -> None:
        admitted.append(sum(limit.try_allocate() for _ in range(600)))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(admitted) == 1000 and limit.active == 1000


# --- configuration -----------------------------------------------------------------------------

def test_the_downstream_connections_monitor_configures_the_limit() -> None:
    limit = downstream_connection_limit(load_bootstrap_text(MONITOR.format(**DOWNSTREAM)))
    assert limit is not None and limit.max_active == 3


def test_no_overload_manager_means_no_limit() -> None:
    assert downstream_connection_limit(load_bootstrap_text("{}")) is None


def test_other_resource_monitors_are_not_supported() -> None:
    with pytest.raises(ConfigError, match="fixed_heap' is not supported"):
        load_bootstrap_text(MONITOR.format(**HEAP))


def test_overload_actions_are_not_supported() -> None:
    text = MONITOR.format(**DOWNSTREAM) + """
  actions:
    - name: envoy.overload_actions.stop_accepting_requests
      triggers: [{name: envoy.resource_monitors.global_downstream_max_connections, threshold: {value: 0.9}}]
"""
    with pytest.raises(ConfigError, match="overload actions are not supported"):
        load_bootstrap_text(text)


# --- the accept-time check on a worker -----------------------------------------------------------

class _ReleaseSignal(DownstreamConnectionLimit):
    """A limit that tells the test when a connection has been released (no polling)."""

    def __init__(self, max_active: int) -> None:
        super().__init__(max_active)
        self.released: asyncio.Queue[None] = asyncio.Queue()

    def release(self) -> None:
        super().release()
        self.released.put_nowait(None)


class _Answer(PassThroughFilter):
    """An HTTP filter that answers 200 at once."""

    def decode_headers(self, headers: Any, end_stream: bool) -> FilterHeadersStatus:
        self.decoder_callbacks.send_local_reply(200, "ok")
        return FilterHeadersStatus.StopIteration


class _Upper:
    """A terminal network filter that writes back what it reads, upper-cased."""

    def initialize_read_filter_callbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def on_new_connection(self) -> FilterStatus:
        return FilterStatus.Continue

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        self.callbacks.connection.write(bytearray(data.upper()), False)
        data.clear()
        return FilterStatus.StopIteration


class _HcmFactory:
    """What worker_handler_factory takes for an HCM: an object with for_worker."""

    def __init__(self, config: HttpConnectionManagerConfig) -> None:
        self.config = config

    def for_worker(self, dispatcher: Dispatcher, store: Store) -> WorkerConnectionHandler:
        return WorkerConnectionHandler(self.config, dispatcher, store)


def _hcm() -> _HcmFactory:
    config = HttpConnectionManagerConfig()
    config.stat_prefix = "ingress"
    config.filter_factories = [lambda cb: cb.add_stream_filter(_Answer())]
    return _HcmFactory(config)


async def _served(port: int, hello: bytes) -> tuple[bytes, asyncio.StreamWriter]:
    """Connect and send `hello`; the first bytes the proxy answers (b"" when it closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(hello)
    try:
        got = await asyncio.wait_for(reader.read(100), 5)
    except ConnectionResetError:
        got = b""
    return got, writer


@pytest.mark.parametrize("path", ["hcm_alone", "network_filters"])
def test_a_connection_over_the_limit_is_closed_at_once_and_counted(path: str) -> None:
    """Limit 2 over two listeners (the count is process-wide): the third connection is closed
    without an answer and counted on its listener; after one closes, a new one is served."""
    dispatcher = Dispatcher("overload-test")
    loop = dispatcher.loop
    store = Store("worker_0")
    limit = _ReleaseSignal(2)
    factories: list[Any] = [_hcm()] if path == "hcm_alone" else [lambda fm: fm.add_read_filter(_Upper())]
    hello = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" if path == "hcm_alone" else b"hi"
    answer = b"HTTP/1.1 200 OK" if path == "hcm_alone" else b"HI"

    async def scenario() -> list[Any]:
        servers = [await loop.create_server(worker_handler_factory(factories, name, connection_limit=limit)(
            dispatcher, store), "127.0.0.1", 0) for name in ("a", "b")]
        port_a, port_b = (s.sockets[0].getsockname()[1] for s in servers)
        first, w1 = await _served(port_a, hello)
        second, w2 = await _served(port_b, hello)
        third, w3 = await _served(port_a, hello)
        w3.close()
        w1.close()
        await asyncio.wait_for(limit.released.get(), 5)
        again, w4 = await _served(port_b, hello)
        for w in (w2, w4):
            w.close()
        for s in servers:
            s.close()
        overflow = [store.counter(OVERFLOW.format(port=p)).value for p in (port_a, port_b)]
        return [first.startswith(answer), second.startswith(answer), third, again.startswith(answer), overflow]

    result: list[Any] = []

    async def run() -> None:
        try:
            result.append(await scenario())
        finally:
            dispatcher.exit()

    dispatcher.post(lambda: loop.create_task(run()))
    dispatcher.run()
    assert result == [[True, True, b"", True, [1, 0]]]
