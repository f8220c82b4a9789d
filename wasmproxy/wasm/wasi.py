"""The WASI preview1 subset Envoy gives plugins, with proxy-wasm-cpp-host's exact return codes.

SDKs built with wasi-libc (C/C++, Rust ``wasm32-wasi``, TinyGo) import these even when a plugin
never touches a file; cpp-host (``src/exports.cc``) answers them without any real I/O:
stdout/stderr become plugin log lines, the environment is the one configured in
``vm_config.environment_variables``, there are no arguments, no files and no pre-opened dirs.
One implementation is registered under both ``wasi_snapshot_preview1`` and ``wasi_unstable``.

Usage (the host core composes this with its own ``env`` table)::

    table = {**hostcalls, **wasi_host_functions(lambda: vm.memory, env_pairs, plugin_log),
             **env_runtime_host_functions()}

``memory`` is a getter because the table is built before the VM exists (the VM links it);
it is called on each use, so it also follows a VM replaced after a failure. ``log`` receives
a Proxy-Wasm log level (2 info, 4 error) and the text of an fd 1/fd 2 write: in Envoy these
are the plugin's own log lines ("wasm log <root_id>: ..."). The stubs that cpp-host reports
through ``context->error()`` (fd_seek, fd_close, proc_exit) are not plugin log lines: Envoy
logs them at trace level in the "wasm" component, and so does ``trace`` here by default.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Callable, Sequence

from wasmproxy.log import get_logger
from wasmproxy.wasm.runtime import HostFunction, InvalidMemoryAccess, WasmMemory, with_signature

__all__ = [
    "WASI_MODULES",
    "RANDOM_GET_MAX_SIZE_BYTES",
    "wasi_host_functions",
    "env_runtime_host_functions",
]

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")

# cpp-host limits.h PROXY_WASM_HOST_WASI_RANDOM_GET_MAX_SIZE_BYTES (as Crypto.getRandomValues()).
RANDOM_GET_MAX_SIZE_BYTES = 64 * 1024

# WASI errno values (wasi_snapshot_preview1 `errno`), only those cpp-host returns.
ESUCCESS = 0
EBADF = 8
EFAULT = 21
EINVAL = 28
ENOENT = 44
ENOSYS = 52
ENOTSUP = 58

# Proxy-Wasm LogLevel values used for fd 1 and fd 2.
LOG_INFO = 2
LOG_ERROR = 4

# __wasi_fdstat_t for stdout/stderr: filetype/flags 0, fs_rights_base = FD_WRITE (64), inheriting 0.
_FDSTAT_STDIO = struct.pack("<QQQ", 0, 64, 0)
_IOVEC = struct.Struct("<II")

# __wasi_clockid_t
_CLOCK_REALTIME = 0
_CLOCK_MONOTONIC = 1


def wasi_host_functions(memory: Callable[[], WasmMemory], env: Sequence[tuple[str, str]],
                        log: Callable[[int, str], None], *,
                        trace: Callable[[str], None] | None = None,
                        realtime_ns: Callable[[], int] = time.time_ns,
                        monotonic_ns: Callable[[], int] = time.monotonic_ns,
                        random_bytes: Callable[[int], bytes] = os.urandom,
                        ) -> dict[tuple[str, str], HostFunction]:
    """The WASI imports, keyed ``(module, name)`` under both WASI module names.

    Clocks, randomness and the trace sink are injectable for tests (fake time).
    """
    if trace is None:
        trace = get_logger("wasm").trace
    env_entries = [f"{k}={v}".encode() + b"\0" for k, v in env]
    env_buf_size = sum(len(e) for e in env_entries)

    def fd_write(fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
        if fd == 1:
            level = LOG_INFO
        elif fd == 2:
            level = LOG_ERROR
        else:
            return EBADF
        mem = memory()
        try:
            parts = [mem.read(buf, n) for buf, n in _IOVEC.iter_unpack(mem.read(iovs, 8 * iovs_len))
                     if n]
        except InvalidMemoryAccess:
            return EFAULT
        data = b"".join(parts)
        if data:
            text = data[:-1] if data.endswith(b"\n") else data  # one trailing newline
            log(level, text.decode("utf-8", "replace"))
        try:
            mem.write_u32(nwritten_ptr, len(data))
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def fd_read(fd: int, iovs: int, iovs_len: int, nread_ptr: int) -> int:
        return ENOSYS  # no files to read

    def fd_seek(fd: int, offset: int, whence: int, newoffset_ptr: int) -> int:
        trace("wasi_unstable fd_seek")
        return ESUCCESS

    def fd_close(fd: int) -> int:
        trace("wasi_unstable fd_close")
        return ESUCCESS

    def fd_fdstat_get(fd: int, stat_ptr: int) -> int:
        if fd not in (1, 2):
            return EBADF
        try:
            memory().write(stat_ptr, _FDSTAT_STDIO)
        except InvalidMemoryAccess:
            pass  # cpp-host ignores this write's failure and reports success
        return ESUCCESS

    def fd_prestat_get(fd: int, buf_ptr: int) -> int:
        return EBADF  # no pre-opened directories

    def fd_prestat_dir_name(fd: int, path_ptr: int, path_len: int) -> int:
        return ENOSYS

    def path_open(fd: int, dirflags: int, path: int, path_len: int, oflags: int,
                  rights_base: int, rights_inheriting: int, fdflags: int, fd_ptr: int) -> int:
        return ENOENT

    def environ_get(environ_ptr: int, environ_buf: int) -> int:
        mem = memory()
        try:
            for entry in env_entries:
                mem.write_u32(environ_ptr, environ_buf)
                mem.write(environ_buf, entry)
                environ_buf += len(entry)
                environ_ptr += 4
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def environ_sizes_get(count_ptr: int, buf_size_ptr: int) -> int:
        mem = memory()
        try:
            mem.write_u32(count_ptr, len(env_entries))
            mem.write_u32(buf_size_ptr, env_buf_size)
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def args_get(argv_ptr: int, argv_buf_ptr: int) -> int:
        return ESUCCESS  # there are none

    def args_sizes_get(argc_ptr: int, argv_buf_size_ptr: int) -> int:
        mem = memory()
        try:
            mem.write_u32(argc_ptr, 0)
            mem.write_u32(argv_buf_size_ptr, 0)
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def clock_time_get(clock_id: int, precision: int, time_ptr: int) -> int:
        if clock_id == _CLOCK_REALTIME:
            now = realtime_ns()
        elif clock_id == _CLOCK_MONOTONIC:
            now = monotonic_ns()
        else:
            return ENOTSUP  # process/thread CPU-time clocks
        try:
            memory().write_u64(time_ptr, now)
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def clock_res_get(clock_id: int, resolution_ptr: int) -> int:
        if clock_id not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
            return ENOTSUP
        try:
            memory().write_u64(resolution_ptr, 1)  # nanoseconds, as cpp-host reports
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def random_get(buf_ptr: int, buf_len: int) -> int:
        if buf_len > RANDOM_GET_MAX_SIZE_BYTES:
            return EINVAL
        if buf_len == 0:
            return ESUCCESS
        try:
            memory().write(buf_ptr, random_bytes(buf_len))
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def poll_oneoff(in_ptr: int, out_ptr: int, nsubscriptions: int, nevents_ptr: int) -> int:
        # No blocking in a proxy worker: report that no event happened.
        try:
            memory().write_u32(nevents_ptr, 0)
        except InvalidMemoryAccess:
            return EFAULT
        return ESUCCESS

    def sched_yield() -> int:
        return ESUCCESS

    def proc_exit(exit_code: int) -> None:
        # Envoy only logs (at trace); wasi-libc then reaches `unreachable` and the call traps.
        trace("wasi_unstable proc_exit")

    i32 = "i32"
    functions: dict[str, HostFunction] = {
        # name: function with its wasm type (a mismatching import is rejected at load)
        "fd_write": with_signature(fd_write, (i32,) * 4),
        "fd_read": with_signature(fd_read, (i32,) * 4),
        "fd_seek": with_signature(fd_seek, (i32, "i64", i32, i32)),
        "fd_close": with_signature(fd_close, (i32,)),
        "fd_fdstat_get": with_signature(fd_fdstat_get, (i32, i32)),
        "fd_prestat_get": with_signature(fd_prestat_get, (i32, i32)),
        "fd_prestat_dir_name": with_signature(fd_prestat_dir_name, (i32,) * 3),
        "path_open": with_signature(path_open, (i32,) * 5 + ("i64", "i64", i32, i32)),
        "environ_get": with_signature(environ_get, (i32, i32)),
        "environ_sizes_get": with_signature(environ_sizes_get, (i32, i32)),
        "args_get": with_signature(args_get, (i32, i32)),
        "args_sizes_get": with_signature(args_sizes_get, (i32, i32)),
        "clock_time_get": with_signature(clock_time_get, (i32, "i64", i32)),
        "clock_res_get": with_signature(clock_res_get, (i32, i32)),
        "random_get": with_signature(random_get, (i32, i32)),
        "poll_oneoff": with_signature(poll_oneoff, (i32,) * 4),
        "sched_yield": with_signature(sched_yield, ()),
        "proc_exit": with_signature(proc_exit, (i32,), ()),
    }
    return {(module, name): fn for module in WASI_MODULES for name, fn in functions.items()}


def env_runtime_host_functions() -> dict[tuple[str, str], HostFunction]:
    """The two Emscripten runtime helpers cpp-host also exports under ``env``."""

    def pthread_equal(left: int, right: int) -> int:
        return int(left == right)

    def emscripten_notify_memory_growth(memory_index: int) -> None:
        return None

    return {("env", "pthread_equal"): with_signature(pthread_equal, ("i32", "i32")),
            ("env", "emscripten_notify_memory_growth"):
                with_signature(emscripten_notify_memory_growth, ("i32",), ())}
