"""Loopback port helpers: ports come from the kernel (bind port 0), never from a guess."""

from __future__ import annotations

import socket
from contextlib import ExitStack

LOOPBACK = "127.0.0.1"


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """`n` distinct ports that were free a moment ago (all held open together, so no repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """One port that was free a moment ago; nothing listens on it (also a 'closed port')."""
    return free_ports(1, host)[0]


def can_connect(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether a TCP connect to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
