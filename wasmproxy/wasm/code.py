"""Plugin code: read it from the config (local file, inline bytes/string, or a remote URI).

Envoy's createWasm reads ``vm_config.code``:

* ``local``: ``filename``, ``inline_bytes`` or ``inline_string`` (Config::DataSource::read);
* ``remote``: ``http_uri`` fetched through the cluster it names, checked against ``sha256``
  (a mismatch is a failed fetch), retried per ``retry_policy`` (default: one retry, 1 s
  base backoff) and kept in a process-wide cache keyed by sha256 (24 h; a failure is cached
  for 10 s), with the wasm.remote_load_* stats. Envoy fetches asynchronously while the
  listener waits for its init manager; wasmproxy fetches on the main thread before the
  listener is built, which is the same order of events. A fetch that fails does not stop the
  proxy: the plugin loads with no VM and its failure policy answers (as in Envoy). With
  ``nack_on_code_cache_miss`` code that is not cached rejects the config instead.

``allow_precompiled`` keeps compiled code on disk (runtime.compile_module's cache) under
``$WASMPROXY_CODE_CACHE`` (default ``~/.cache/wasmproxy/wasm``).

Main thread only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from ..config.errors import ConfigError
from ..log import get_logger
from .runtime import WasmLoadError, WasmModule, compile_module
from .stats import RemoteLoadStats

__all__ = ["CodeSource", "cached_remote_code", "compile_code", "fetch_remote", "precompiled_cache_dir", "read_code"]

_log = get_logger("wasm")

_CACHE_TTL_S = 24 * 3600
_NEGATIVE_CACHE_S = 10
_DEFAULT_RETRIES = 1
_DEFAULT_BACKOFF_S = 1.0
_MAX_BACKOFF_FACTOR = 10


@dataclass
class CodeSource:
    """The code of a plugin and where it came from (a path, "<inline>", or the remote URI)."""

    code: bytes
    source: str
    remote: bool = False
    # nack_on_code_cache_miss and the code was not cached: the config is rejected (Envoy would
    # fetch in the background for a later config; a rejected static config just exits).
    nacked: bool = False


def read_code(vm_config: Any, cluster_hosts: Callable[[str], list[tuple[str, int]]],
              remote_stats: RemoteLoadStats) -> CodeSource:
    """The code `vm_config.code` names; empty code means "could not be had" (remote only).

    `cluster_hosts(name)` lists (host, port) of a cluster, for remote fetches. Raises
    ConfigError for a local file that cannot be read (Envoy rejects the config then).
    """
    code = vm_config.code
    if code.HasField("remote"):
        remote = code.remote
        uri = remote.http_uri.uri
        _log.warning("Wasm remote code fetch is unstable and may cause a crash")  # Envoy 1.40 says so too
        if vm_config.nack_on_code_cache_miss and cached_remote_code(remote, remote_stats) is None:
            return CodeSource(b"", uri, remote=True, nacked=True)
        return CodeSource(fetch_remote(remote, cluster_hosts, remote_stats), uri, remote=True)
    if not code.HasField("local"):
        return CodeSource(b"", "")
    local = code.local
    which = local.WhichOneof("specifier")
    if which == "filename":
        try:
            with open(local.filename, "rb") as f:
                return CodeSource(f.read(), local.filename)
        except OSError:
            raise ConfigError(f"Invalid path: {local.filename}") from None  # Envoy 1.40's words
    if which == "inline_bytes":
        return CodeSource(bytes(local.inline_bytes), "<inline>")
    if which == "inline_string":
        return CodeSource(local.inline_string.encode(), "<inline>")
    if which == "environment_variable":
        value = os.environ.get(local.environment_variable)
        if value is None:
            raise ConfigError(f"Environment variable doesn't exist: {local.environment_variable}")
        return CodeSource(value.encode(), "<inline>")
    return CodeSource(b"", "")


# -- remote code ----------------------------------------------------------------------------


@dataclass
class _CacheEntry:
    code: bytes
    use_time: float
    fetch_time: float


_code_cache: dict[str, _CacheEntry] = {}
_code_cache_lock = threading.Lock()


def cached_remote_code(remote: Any, stats: RemoteLoadStats) -> bytes | None:
    """The cached code for a RemoteDataSource, or None (counted as a cache miss)."""
    with _code_cache_lock:
        entry = _code_cache.get(remote.sha256.lower())
    if entry is None or not entry.code:
        stats.inc(stats.cache_misses)
        return None
    return entry.code


def fetch_remote(remote: Any, cluster_hosts: Callable[[str], list[tuple[str, int]]],
                 stats: RemoteLoadStats, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> bytes:
    """The code of a RemoteDataSource, from the process cache or fetched now (b"" on failure)."""
    sha = remote.sha256.lower()
    now = monotonic()
    with _code_cache_lock:
        for key in [k for k, e in _code_cache.items() if now - e.use_time > _CACHE_TTL_S and k != sha]:
            del _code_cache[key]
        entry = _code_cache.get(sha)
        if entry is not None:
            entry.use_time = now
            if entry.code:
                stats.inc(stats.cache_hits)
                return entry.code
            if now - entry.fetch_time < _NEGATIVE_CACHE_S:
                stats.inc(stats.cache_negative_hits)
                _log.warning("createWasm: failed to load (cached) from %s", remote.http_uri.uri)
                return b""
        else:
            stats.inc(stats.cache_misses)
    code = _fetch_with_retries(remote, cluster_hosts, sleep)
    with _code_cache_lock:
        _code_cache[sha] = _CacheEntry(code, now, now)
        stats.set_entries(len(_code_cache))
    stats.inc(stats.fetch_successes if code else stats.fetch_failures)
    return code


def _fetch_with_retries(remote: Any, cluster_hosts: Callable[[str], list[tuple[str, int]]],
                        sleep: Callable[[float], None]) -> bytes:
    retries = _DEFAULT_RETRIES
    backoff_s = _DEFAULT_BACKOFF_S
    if remote.HasField("retry_policy"):
        policy = remote.retry_policy
        if policy.HasField("num_retries"):
            retries = policy.num_retries.value
        if policy.HasField("retry_back_off") and policy.retry_back_off.HasField("base_interval"):
            backoff_s = policy.retry_back_off.base_interval.ToMilliseconds() / 1000
    for attempt in range(retries + 1):
        code = _fetch_once(remote, cluster_hosts)
        if code:
            return code
        if attempt < retries:
            sleep(min(backoff_s * (2 ** attempt), backoff_s * _MAX_BACKOFF_FACTOR))
    get_logger("config").warning("Retry limit exceeded for fetching data from remote data source.")
    return b""


def _fetch_once(remote: Any, cluster_hosts: Callable[[str], list[tuple[str, int]]]) -> bytes:
    """One GET of http_uri.uri through a host of http_uri.cluster (Config::DataFetcher)."""
    http_uri = remote.http_uri
    uri = urlsplit(http_uri.uri)
    hosts = cluster_hosts(http_uri.cluster)
    if not hosts:
        _log.debug("fetch remote data from [uri = %s]: no host in cluster %s", http_uri.uri, http_uri.cluster)
        return b""
    host, port = hosts[0]
    timeout = http_uri.timeout.ToMilliseconds() / 1000 if http_uri.HasField("timeout") else 1.0
    path = (uri.path or "/") + (f"?{uri.query}" if uri.query else "")
    conn = http.client.HTTPConnection(host, port, timeout=timeout or None)
    try:
        conn.request("GET", path, headers={"Host": uri.netloc or host})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        _log.debug("fetch remote data from [uri = %s]: %s", http_uri.uri, e)
        return b""
    finally:
        conn.close()
    if response.status != 200:
        _log.debug("fetch remote data [uri = %s]: response status code %d", http_uri.uri, response.status)
        return b""
    if hashlib.sha256(body).hexdigest() != remote.sha256.lower():
        _log.debug("fetch remote data [uri = %s]: data is invalid", http_uri.uri)
        return b""
    return body


def clear_code_cache_for_testing() -> None:
    with _code_cache_lock:
        _code_cache.clear()


# -- compiling ------------------------------------------------------------------------------


def precompiled_cache_dir() -> str:
    return os.environ.get("WASMPROXY_CODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wasmproxy", "wasm")


def compile_code(code: bytes, name: str, allow_precompiled: bool) -> WasmModule | None:
    """The compiled module, or None after logging why (Envoy's words: a corrupt module)."""
    try:
        return compile_module(code, cache_dir=precompiled_cache_dir() if allow_precompiled else None, name=name)
    except WasmLoadError as e:
        _log.debug("%s", e)
        _log.error("Failed to parse corrupted Wasm module")
        _log.error("Failed to load Wasm code")
        return None
