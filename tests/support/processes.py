"""Run real Envoy and wasmproxy as child processes on a given bootstrap file.

Both are started the same way, judged ready the same way (admin ``/ready`` answers 200 and
every listener accepts), and always stopped by the caller (use them as context managers).
Their output goes to a file so a failing test can show it.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import yaml

from .ports import LOOPBACK, can_connect
from .raw_http import PeerClosed, RawConnection, Response

REPO = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("WASMPROXY_ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))
READY_DEADLINE_S = float(os.environ.get("WASMPROXY_READY_DEADLINE_S", "30"))
STOP_DEADLINE_S = 10.0

_base_ids = itertools.count(1)
_live: weakref.WeakSet[ProxyProcess] = weakref.WeakSet()


class ProcessError(RuntimeError):
    """A proxy did not start or died; the message carries the tail of its log."""


def live_processes() -> list[ProxyProcess]:
    """Processes started and not yet stopped (for showing logs when a test fails)."""
    return [p for p in _live if p.running]


def _config_ports(config_path: Path) -> tuple[int, list[int]]:
    """(admin port, listener ports) from a bootstrap; the readiness probe needs both."""
    doc = yaml.safe_load(config_path.read_text())
    admin = doc["admin"]["address"]["socket_address"]["port_value"]
    listeners = [
        l["address"]["socket_address"]["port_value"]
        for l in (doc.get("static_resources") or {}).get("listeners") or []
        if "socket_address" in l.get("address", {})
    ]
    return int(admin), [int(p) for p in listeners]


class ProxyProcess:
    """A proxy child process: start(), wait_ready(), stop(); the log is in `log_path`."""

    name = "proxy"

    def __init__(self, config_path: str | Path, concurrency: int = 1, log_level: str = "warning") -> None:
        self.config_path = Path(config_path)
        self.concurrency = concurrency
        self.log_level = log_level
        self.admin_port, self.listener_ports = _config_ports(self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None
        fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn the process and wait until it serves; on failure stop it and raise ProcessError."""
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def spawn(self) -> None:
        """Start the process without waiting; the caller must wait_ready() and stop() it."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(), cwd=REPO)
        _live.add(self)

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        """Poll admin /ready, then every listener, until all answer or the deadline passes."""
        assert self.proc is not None
        deadline = time.monotonic() + deadline_s
        probes: list[tuple[str, Callable[[], bool]]] = [("admin /ready", self._admin_ready)]
        probes += [(f"listener port {p}", functools.partial(can_connect, p)) for p in self.listener_ports]
        while probes:
            if probes[0][1]():
                probes.pop(0)
                continue
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} not ready after {deadline_s}s (waiting for "
                                   f"{probes[0][0]})\n{self.log_tail()}")
            try:
                # Waiting on the child doubles as the poll interval and notices an early exit.
                code = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise ProcessError(f"{self.name} exited with {code} during startup\n{self.log_tail()}")

    def admin(self, path: str, method: str = "GET", timeout: float = 10.0) -> Response:
        """One request to the admin listener (e.g. admin("/stats?format=json").json())."""
        with RawConnection(LOOPBACK, self.admin_port, timeout=timeout) as c:
            return c.request(method, path, host="admin")

    def _admin_ready(self) -> bool:
        try:
            return self.admin("/ready", timeout=2.0).status == 200
        except (OSError, PeerClosed, TimeoutError, ValueError):
            return False

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_DEADLINE_S; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        _live.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_DEADLINE_S)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(tail)

    def rss_kib(self) -> int:
        """Resident set size (VmRSS from /proc/<pid>/status) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise ProcessError(f"no VmRSS for pid {self.pid}")


class EnvoyProcess(ProxyProcess):
    """Real Envoy 1.40, the reference."""

    name = "envoy"

    def argv(self) -> list[str]:
        # --base-id keeps concurrent Envoys (other tests, other engineers) from sharing memory
        # segments; hot restart is off anyway.
        base_id = (os.getpid() * 97 + next(_base_ids)) % 2_000_000
        return [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
                "--base-id", str(base_id), "--disable-hot-restart", "-l", self.log_level]


class WasmproxyProcess(ProxyProcess):
    """wasmproxy from this checkout, with the same command line shape as Envoy."""

    name = "wasmproxy"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "wasmproxy", "-c", str(self.config_path),
                "--concurrency", str(self.concurrency), "-l", self.log_level]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env
