"""envoy_resolve_dns: name resolution the way Envoy's default (c-ares) resolver answers a Wasm.

Envoy resolves with DnsLookupFamily::Auto (IPv6 answers if there are any, else IPv4) and hands
the plugin each address as ``Address::asString()`` with port 0 ("127.0.0.1:0", "[::1]:0").
c-ares answers IP literals, /etc/hosts names and localhost inside the resolve call, so the plugin's
envoy_on_resolve_dns runs before envoy_resolve_dns returns; other names are looked up on a
helper thread and the answer is posted to the Wasm's own thread. A name that does not exist
is a completed lookup with no addresses; only a resolver failure is reported as one (None).
TTLs: 0 for literals and hosts entries (as c-ares); getaddrinfo has none either, so 0 too.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Callable

__all__ = ["resolve", "resolve_inline"]

HOSTS_FILE = "/etc/hosts"

def _format(address: str) -> str:
    ip = ipaddress.ip_address(address.partition("%")[0])
    return f"[{ip}]:0" if ip.version == 6 else f"{ip}:0"


def _auto(addresses: list[str]) -> list[tuple[str, int]]:
    """DnsLookupFamily::Auto: the IPv6 answers when there are any, else the IPv4 ones; no repeats."""
    formatted = list(dict.fromkeys(_format(a) for a in addresses))
    v6 = [a for a in formatted if a.startswith("[")]
    return [(a, 0) for a in (v6 or formatted)]


def _hosts_entries(name: str, hosts_file: str) -> list[str]:
    try:
        with open(hosts_file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    wanted = name.lower()
    for line in lines:
        words = line.partition("#")[0].split()
        if len(words) >= 2 and wanted in (w.lower() for w in words[1:]):
            try:
                ipaddress.ip_address(words[0].partition("%")[0])
            except ValueError:
                continue
            found.append(words[0])
    return found


def resolve_inline(name: str, hosts_file: str = HOSTS_FILE) -> list[tuple[str, int]] | None:
    """The answer c-ares gives inside the call (an IP literal or a hosts-file name), else None."""
    try:
        return [(_format(name), 0)]
    except ValueError:
        pass
    entries = _hosts_entries(name, hosts_file) if name else []
    lowered = name.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        # c-ares answers localhost itself (RFC 6761) when the hosts file has no IPv6 entry for it.
        if not any(":" in e for e in entries):
            entries.append("::1")
    return _auto(entries) if entries else None


def _lookup(name: str) -> list[tuple[str, int]] | None:
    if not name:
        return []
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as e:
        no_such_name = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, n)}
        return [] if e.errno in no_such_name else None
    except (OSError, UnicodeError):
        return None
    return _auto([str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)])


def resolve(name: str, post: Callable[[Callable[[], None]], None],
            deliver: Callable[[list[tuple[str, int]] | None], None]) -> None:
    """Resolve `name`: inline when c-ares would, else on a helper thread with `deliver` posted."""
    inline = resolve_inline(name)
    if inline is not None:
        deliver(inline)
        return

    def work() -> None:
        results = _lookup(name)
        try:
            post(lambda: deliver(results))
        except RuntimeError:  # the thread's dispatcher has exited: nobody is left to answer
            pass

    threading.Thread(target=work, name="wasm-dns", daemon=True).start()
