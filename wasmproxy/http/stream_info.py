"""StreamInfo: what is known about one stream, for access logs and Wasm properties.

Mirrors the parts of Envoy's StreamInfo::StreamInfo that access logs and the
Proxy-Wasm property API read. Owned by one stream on one worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Address:
    """A socket address; `port` is 0 for pipes."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class ConnectionInfo:
    """Downstream connection facts shared by every stream on the connection."""

    id: int
    local_address: Address
    remote_address: Address
    # Address after use_remote_address / x-forwarded-for processing (source.address).
    direct_remote_address: Address | None = None
    tls: bool = False
    requested_server_name: str = ""
    termination_details: str = ""


@dataclass(init=False)
class StreamInfo:
    """One stream's facts. Built once per request: the immutable defaults stay at class level
    (a dataclass without slots keeps them there) and __init__ sets only the per-stream values
    and the mutable containers; any field may still be given by keyword, as before."""

    connection: ConnectionInfo
    # Wall-clock start (seconds since epoch) and a monotonic start for durations
    # (time.time() / time.monotonic() when not given).
    start_time: float = 0.0
    start_monotonic: float = 0.0
    protocol: str = "HTTP/1.1"
    request_id: str = ""
    route_name: str = ""
    # A route was resolved (it may be unnamed: Wasm's xds.route_name is then empty, not absent).
    route_resolved: bool = False
    virtual_cluster_name: str = ""
    upstream_cluster: str = ""
    upstream_host: Address | None = None
    upstream_local_address: Address | None = None
    upstream_transport_failure_reason: str = ""
    response_code: int | None = None
    response_code_details: str = ""
    # Envoy's short response flags, e.g. "UF", "URX", "NR", "UT", "UH" (joined with "," in logs).
    response_flags: list[str] = field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0
    # Monotonic timestamps (None until they happen).
    first_upstream_tx: float | None = None
    last_upstream_rx: float | None = None
    first_upstream_rx: float | None = None
    last_downstream_rx: float | None = None
    first_downstream_tx: float | None = None
    last_downstream_tx: float | None = None
    # filter_state: name -> bytes (Wasm set_property writes here); dynamic metadata: namespace -> dict.
    filter_state: dict[str, Any] = field(default_factory=dict)
    dynamic_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    listener_name: str = ""
    listener_metadata: dict[str, Any] = field(default_factory=dict)
    route_metadata: dict[str, Any] = field(default_factory=dict)
    cluster_metadata: dict[str, Any] = field(default_factory=dict)
    attempt_count: int = 0
    upstream_request_attempt_count: int = 0

    def __init__(self, connection: ConnectionInfo, start_time: float | None = None,
                 start_monotonic: float | None = None, **fields: Any) -> None:
        self.connection = connection
        self.start_time = time.time() if start_time is None else start_time
        self.start_monotonic = time.monotonic() if start_monotonic is None else start_monotonic
        self.response_flags = []
        self.filter_state = {}
        self.dynamic_metadata = {}
        self.listener_metadata = {}
        self.route_metadata = {}
        self.cluster_metadata = {}
        if fields:
            names = _STREAM_INFO_FIELDS
            for name, value in fields.items():
                if name not in names:
                    raise TypeError(f"StreamInfo.__init__() got an unexpected keyword argument '{name}'")
                setattr(self, name, value)

    def duration(self) -> float:
        """Seconds since the stream started."""
        return time.monotonic() - self.start_monotonic

    def add_response_flag(self, flag: str) -> None:
        if flag not in self.response_flags:
            self.response_flags.append(flag)


_STREAM_INFO_FIELDS = frozenset(StreamInfo.__dataclass_fields__)
