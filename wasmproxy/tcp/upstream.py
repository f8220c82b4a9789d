"""TcpUpstream: tcp_proxy's connection to one upstream host (Envoy's TCP conn pool + TcpUpstream).

One connection per downstream connection, never reused, with half-close both ways. It keeps
Envoy's ``cluster.<name>.*`` accounting for a TCP pool: a connection is a pending request
while it connects and an active request once connected, so Envoy's upstream_rq_* and
``upstream_cx_destroy_*_with_active_rq`` counters move as they do there. Its owner (the
filter) gets ``on_upstream_connected()``, ``on_upstream_connect_failure(timeout)``,
``on_upstream_data(buffer, end_stream)``, ``on_upstream_closed(remote)`` and the watermark calls.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..upstream.cluster_manager import ThreadLocalCluster
    from ..upstream.host import Host

__all__ = ["TcpUpstream"]

_CONNECTING, _OPEN, _CLOSED = 0, 1, 2


class TcpUpstream(asyncio.Protocol):
    """The upstream side of one proxied connection. Worker thread only."""

    def __init__(self, owner: Any, cluster: "ThreadLocalCluster", host: "Host", dispatcher: Any) -> None:
        self.owner = owner
        self.cluster = cluster
        self.host = host
        self.dispatcher = dispatcher
        self.stats = cluster.stats
        self.state = _CONNECTING
        self.transport: Any = None
        self.read_buffer = bytearray()
        self.read_end_stream = False
        self.write_end_stream = False
        self.flushing = False
        self._read_disable_count = 0
        self._task: asyncio.Future[Any] | None = None
        self._connect_timer = dispatcher.create_timer(self._on_connect_timeout)
        self._started = dispatcher.time_source.monotonic()

    # -- connecting ---------------------------------------------------------------------------

    def connect(self) -> None:
        stats, host = self.stats, self.host
        self.cluster.info.resource_manager.connections.inc()
        stats.inc("upstream_cx_total")
        stats.gauge_add("upstream_cx_active", 1)
        stats.inc("upstream_rq_pending_total")
        stats.gauge_add("upstream_rq_pending_active", 1)
        host.stats.cx_total += 1
        host.stats.cx_active += 1
        loop = self.dispatcher.loop
        self._task = loop.create_task(loop.create_connection(lambda: self, host.address.host, host.address.port))
        self._task.add_done_callback(self._on_connect_done)
        self._connect_timer.enable_timer(self.cluster.info.connect_timeout_ms)

    def _on_connect_done(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or self.state != _CONNECTING:
            return
        if task.exception() is not None:
            self._connect_failed(timeout=False)

    def _on_connect_timeout(self) -> None:
        if self.state != _CONNECTING:
            return
        self.stats.inc("upstream_cx_connect_timeout")
        self._connect_failed(timeout=True)

    def _connect_failed(self, timeout: bool) -> None:
        self._connect_timer.disable_timer()
        self._abandon_connect()
        self.stats.inc("upstream_cx_connect_fail")
        self.host.stats.cx_connect_fail += 1
        self.stats.inc("upstream_rq_pending_failure_eject")
        # A refused connect is a remote close; a timed-out one is closed by us (Envoy 1.40).
        self._gone(local=timeout, with_active_rq=False)
        self.owner.on_upstream_connect_failure(timeout)

    def _abandon_connect(self) -> None:
        self.state = _CLOSED
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()
        self.stats.gauge_add("upstream_rq_pending_active", -1)

    def cancel(self) -> None:
        """The downstream went away while connecting (Envoy cancels the pool request)."""
        if self.state != _CONNECTING:
            return
        self._connect_timer.disable_timer()
        self._abandon_connect()
        self.stats.inc("upstream_rq_cancelled")
        self._gone(local=True, with_active_rq=False)

    def _gone(self, local: bool, with_active_rq: bool) -> None:
        stats = self.stats
        self.cluster.info.resource_manager.connections.dec()
        stats.gauge_add("upstream_cx_active", -1)
        self.host.stats.cx_active -= 1
        stats.inc("upstream_cx_destroy")
        side = "local" if local else "remote"
        stats.inc(f"upstream_cx_destroy_{side}")
        if with_active_rq:
            stats.inc("upstream_cx_destroy_with_active_rq")
            stats.inc(f"upstream_cx_destroy_{side}_with_active_rq")
            stats.gauge_add("upstream_rq_active", -1)
            self.host.stats.rq_active -= 1
        now = self.dispatcher.time_source.monotonic()
        stats.record_ms("upstream_cx_length_ms", (now - self._started) * 1000)

    # -- the owner's calls --------------------------------------------------------------------

    def write(self, data: bytearray, end_stream: bool) -> None:
        if self.state != _OPEN or self.write_end_stream:
            return
        if data:
            self.stats.inc("upstream_cx_tx_bytes_total", len(data))
            self.transport.write(bytes(data))
            data.clear()
        if end_stream:
            self.write_end_stream = True
            if self.read_end_stream:
                self._close(local=True, flush=True)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def read_disable(self, disable: bool) -> None:
        if disable:
            self._read_disable_count += 1
            if self._read_disable_count == 1 and self.state == _OPEN:
                self.transport.pause_reading()
        elif self._read_disable_count > 0:
            self._read_disable_count -= 1
            if self._read_disable_count == 0 and self.state == _OPEN:
                self.transport.resume_reading()

    def close(self, flush: bool, reset: bool = False) -> bool:
        """Close from our side (``reset``: with an RST); True when buffered bytes are still being
        flushed upstream."""
        if self.state != _OPEN:
            return False
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pending = flush and self.transport.get_write_buffer_size() > 0
        self._close(local=True, flush=flush)
        if pending:
            self.flushing = True
        return pending

    def _close(self, local: bool, flush: bool) -> None:
        self.state = _CLOSED
        if flush:
            self.transport.close()
        else:
            self.transport.abort()
        self._gone(local=local, with_active_rq=True)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.state != _CONNECTING:
            transport.abort()
            return
        self._connect_timer.disable_timer()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        limit = self.cluster.info.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        stats = self.stats
        now = self.dispatcher.time_source.monotonic()
        stats.record_ms("upstream_cx_connect_ms", (now - self._started) * 1000)
        stats.gauge_add("upstream_rq_pending_active", -1)
        stats.inc("upstream_rq_total")
        stats.gauge_add("upstream_rq_active", 1)
        self.host.stats.rq_total += 1
        self.host.stats.rq_active += 1
        self.state = _OPEN
        if self._read_disable_count:
            transport.pause_reading()
        self.owner.on_upstream_connected()

    def data_received(self, data: bytes) -> None:
        if self.state != _OPEN:
            return
        self.stats.inc("upstream_cx_rx_bytes_total", len(data))
        self.read_buffer += data
        self.owner.on_upstream_data(self.read_buffer, False)

    def eof_received(self) -> bool:
        if self.state != _OPEN:
            return False
        self.read_end_stream = True
        if not self.write_end_stream:
            self.owner.on_upstream_data(self.read_buffer, True)
            return True
        # Both directions have ended: the socket closes (RemoteClose) before the FIN goes on.
        self._close(local=False, flush=True)
        self.owner.on_upstream_data(self.read_buffer, True)
        self.owner.on_upstream_closed(remote=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flushing:
            self.flushing = False
            self.owner.on_upstream_flushed()
        if self.state == _OPEN:
            self._close(local=False, flush=False)
            self.owner.on_upstream_closed(remote=True, reset=isinstance(exc, ConnectionResetError))

    def pause_writing(self) -> None:
        if self.state == _OPEN:
            self.owner.on_upstream_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        if self.state == _OPEN:
            self.owner.on_upstream_below_write_buffer_low_watermark()
