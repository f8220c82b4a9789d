"""wasm/wasi.py: the WASI subset, with the return codes real Envoy 1.40 gives (checked by running
a C plugin calling each function under Envoy; see the report in the commit history)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import wasmtime

from wasmproxy.wasm import wasi
from wasmproxy.wasm.runtime import FuncSig, WasmTrap, WasmVm, compile_module, engine

WAT_DIR = Path(__file__).parent / "wat"
END = 65536  # one page: the fixture's memory size


@pytest.fixture
def mem():
    """A real linear memory (one page) to run the host functions against."""
    vm = WasmVm(compile_module(wasmtime.wat2wasm('(module (memory (export "memory") 1))')), {})
    return vm.memory


def funcs(mem, env=(), logs=None, traces=None, **kw):
    logs = logs if logs is not None else []
    traces = traces if traces is not None else []
    table = wasi.wasi_host_functions(lambda: mem, list(env), lambda lvl, msg: logs.append((lvl, msg)),
                                     trace=traces.append, **kw)
    return {name: fn for (module, name), fn in table.items() if module == "wasi_snapshot_preview1"}


def test_registered_under_both_module_names(mem):
    table = wasi.wasi_host_functions(lambda: mem, [], lambda lvl, msg: None)
    names = {n for (m, n) in table if m == "wasi_snapshot_preview1"}
    assert names == {n for (m, n) in table if m == "wasi_unstable"}
    assert {"fd_write", "environ_get", "clock_time_get", "random_get", "proc_exit",
            "poll_oneoff", "sched_yield", "clock_res_get", "fd_prestat_get"} <= names


def write_iovs(mem, at: int, bufs: list[tuple[int, bytes]]) -> None:
    for i, (ptr, data) in enumerate(bufs):
        mem.write(ptr, data)
        mem.write(at + 8 * i, struct.pack("<II", ptr, len(data)))


def test_fd_write_stdout_is_info_stderr_is_error_one_newline_stripped(mem):
    logs: list = []
    f = funcs(mem, logs=logs)
    write_iovs(mem, 100, [(1000, b"hello "), (2000, b""), (3000, b"world\n\n")])
    assert f["fd_write"](1, 100, 3, 50) == 0
    assert mem.read_u32(50) == 13
    assert f["fd_write"](2, 100, 1, 50) == 0
    assert logs == [(2, "hello world\n"), (4, "hello ")]


def test_fd_write_errors(mem):
    logs: list = []
    f = funcs(mem, logs=logs)
    write_iovs(mem, 100, [(1000, b"x")])
    assert f["fd_write"](3, 100, 1, 50) == wasi.EBADF
    assert f["fd_write"](1, END - 4, 1, 50) == wasi.EFAULT  # iovec out of bounds
    mem.write(200, struct.pack("<II", END - 1, 2))
    assert f["fd_write"](1, 200, 1, 50) == wasi.EFAULT  # buffer out of bounds
    assert logs == []
    assert f["fd_write"](1, 100, 1, END) == wasi.EFAULT  # logged, then nwritten fails
    assert f["fd_write"](1, 100, 0, 50) == 0 and mem.read_u32(50) == 0


def test_fd_stubs_match_envoy(mem):
    logs: list = []
    traces: list = []
    f = funcs(mem, logs=logs, traces=traces)
    assert f["fd_read"](0, 0, 0, 0) == wasi.ENOSYS
    assert f["fd_prestat_get"](3, 0) == wasi.EBADF
    assert f["fd_prestat_dir_name"](3, 0, 10) == wasi.ENOSYS
    assert f["path_open"](3, 0, 0, 0, 0, 0, 0, 0, 0) == wasi.ENOENT
    assert f["fd_seek"](1, -1, 0, 0) == 0
    assert f["fd_close"](1) == 0
    # Envoy logs these at trace level in its own "wasm" component, not as plugin log lines.
    assert (logs, traces) == ([], ["wasi_unstable fd_seek", "wasi_unstable fd_close"])


def test_fd_fdstat_get(mem):
    f = funcs(mem)
    assert f["fd_fdstat_get"](0, 100) == wasi.EBADF
    mem.write(100, b"\xaa" * 24)
    assert f["fd_fdstat_get"](1, 100) == 0
    assert mem.read(100, 24) == struct.pack("<QQQ", 0, 64, 0)
    assert f["fd_fdstat_get"](2, END - 8) == 0  # Envoy reports success even when it can't write


def test_environ(mem):
    f = funcs(mem, env=[("A", "1"), ("KEY", "value")])
    assert f["environ_sizes_get"](10, 14) == 0
    assert (mem.read_u32(10), mem.read_u32(14)) == (2, len(b"A=1\0KEY=value\0"))
    assert f["environ_get"](100, 200) == 0
    assert (mem.read_u32(100), mem.read_u32(104)) == (200, 204)
    assert mem.read(200, 14) == b"A=1\0KEY=value\0"
    assert f["environ_get"](END - 2, 200) == wasi.EFAULT
    assert f["environ_sizes_get"](END, 14) == wasi.EFAULT


def test_args_are_empty(mem):
    f = funcs(mem)
    mem.write(10, b"\xff" * 8)
    assert f["args_sizes_get"](10, 14) == 0
    assert mem.read(10, 8) == b"\0" * 8
    assert f["args_get"](0, 0) == 0
    assert f["args_sizes_get"](END, 14) == wasi.EFAULT


def test_clocks(mem):
    f = funcs(mem, realtime_ns=lambda: 1_700_000_000_123_456_789, monotonic_ns=lambda: 42)
    assert f["clock_time_get"](0, 1, 8) == 0 and mem.read_u64(8) == 1_700_000_000_123_456_789
    assert f["clock_time_get"](1, 1, 8) == 0 and mem.read_u64(8) == 42
    assert f["clock_time_get"](2, 1, 8) == wasi.ENOTSUP
    assert f["clock_time_get"](0, 1, END - 4) == wasi.EFAULT
    mem.write_u64(16, 777)
    assert f["clock_res_get"](0, 16) == 0 and mem.read_u64(16) == 1
    assert f["clock_res_get"](1, 16) == 0
    assert f["clock_res_get"](3, 16) == wasi.ENOTSUP
    assert f["clock_res_get"](0, END) == wasi.EFAULT


def test_random_get(mem):
    f = funcs(mem, random_bytes=lambda n: b"\x07" * n)
    assert f["random_get"](100, 16) == 0 and mem.read(100, 16) == b"\x07" * 16
    assert f["random_get"](0, 65536) == 0
    assert f["random_get"](0, 65537) == wasi.EINVAL
    assert f["random_get"](END, 0) == 0
    assert f["random_get"](END - 4, 8) == wasi.EFAULT


def test_poll_oneoff_sched_yield_proc_exit(mem):
    logs: list = []
    traces: list = []
    f = funcs(mem, logs=logs, traces=traces)
    mem.write_u32(8, 99)
    assert f["poll_oneoff"](100, 200, 1, 8) == 0 and mem.read_u32(8) == 0
    assert f["poll_oneoff"](100, 200, 1, END) == wasi.EFAULT
    assert f["sched_yield"]() == 0
    assert f["proc_exit"](3) is None
    assert (logs, traces) == ([], ["wasi_unstable proc_exit"])


def test_env_runtime_helpers():
    h = wasi.env_runtime_host_functions()
    assert h[("env", "pthread_equal")](5, 5) == 1
    assert h[("env", "pthread_equal")](5, 6) == 0
    assert h[("env", "emscripten_notify_memory_growth")](0) is None


def test_wasi_unstable_module_links_and_writes(tmp_path):
    code = wasmtime.wat2wasm("""(module
      (import "wasi_unstable" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "legacy\\n")
      (data (i32.const 0) "\\10\\00\\00\\00\\07\\00\\00\\00")
      (func (export "run") (result i32) i32.const 1 i32.const 0 i32.const 1 i32.const 32 call $w))""")
    logs: list = []
    box: dict = {}
    table = wasi.wasi_host_functions(lambda: box["vm"].memory, [], lambda l, m: logs.append((l, m)))
    vm = box["vm"] = WasmVm(compile_module(code), table)
    assert vm.get_function("run")() == 0
    assert logs == [(2, "legacy")]


# -- a real C program built against wasi-libc --------------------------------------------------

C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((export_name("run"))) int run(void) {
  printf("hello from wasi\n");
  fflush(stdout);
  fprintf(stderr, "oops\n");
  const char *v = getenv("MY_KEY");
  printf("MY_KEY=%s\n", v ? v : "(unset)");
  fflush(stdout);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int)ts.tv_sec;
}

__attribute__((export_name("quit"))) void quit(void) { exit(3); }
"""


@pytest.fixture(scope="module")
def c_program(tmp_path_factory) -> bytes:
    clang = shutil.which("clang-19")
    if clang is None:
        pytest.skip("clang-19 (wasm32-wasi) not installed")
    d = tmp_path_factory.mktemp("wasi_c")
    (d / "prog.c").write_text(C_PROGRAM)
    subprocess.run([clang, "--target=wasm32-wasi", "-mexec-model=reactor", "-O1",
                    str(d / "prog.c"), "-o", str(d / "prog.wasm")], check=True, timeout=120)
    return (d / "prog.wasm").read_bytes()


def c_vm(code: bytes, logs: list, traces: list | None = None) -> WasmVm:
    box: dict = {}
    table = wasi.wasi_host_functions(lambda: box["vm"].memory, [("MY_KEY", "my value")],
                                     lambda lvl, msg: logs.append((lvl, msg)),
                                     trace=(traces if traces is not None else []).append,
                                     realtime_ns=lambda: 1_234_000_000_999)
    vm = box["vm"] = WasmVm(compile_module(code, name="prog"), table)
    vm.get_function("_initialize")()
    return vm


def test_c_program_stdout_stderr_getenv_and_clock(c_program):
    logs: list = []
    vm = c_vm(c_program, logs)
    assert vm.get_function("run")() == 1234
    assert logs == [(2, "hello from wasi"), (4, "oops"), (2, "MY_KEY=my value")]


def test_c_program_exit_only_logs_then_the_guest_traps(c_program):
    """As in Envoy 1.40: 'Uncaught RuntimeError: unreachable' with __wasi_proc_exit on top."""
    logs: list = []
    traces: list = []
    vm = c_vm(c_program, logs, traces)
    with pytest.raises(WasmTrap) as e:
        vm.get_function("quit")()
    assert e.value.message == "Uncaught RuntimeError: unreachable"
    assert (logs, traces) == ([], ["wasi_unstable proc_exit"])


def test_default_trace_sink_is_the_wasm_component_loggers_trace(mem, monkeypatch):
    from wasmproxy.log import get_logger
    traces: list = []
    monkeypatch.setattr(get_logger("wasm"), "trace", traces.append)
    wasi.wasi_host_functions(lambda: mem, [], lambda lvl, msg: None)[("wasi_unstable", "fd_close")](3)
    assert traces == ["wasi_unstable fd_close"]


def test_c_program_signatures_read_from_the_binary_match_wasmtime(c_program):
    """A real wasi-libc module: runtime.py's own section reader agrees with wasmtime."""
    m = compile_module(c_program)
    reflected = wasmtime.Module(engine(), c_program)
    sig = lambda ft: FuncSig(tuple(map(str, ft.params)), tuple(map(str, ft.results)))  # noqa: E731
    assert m.imports == [(i.module, i.name, sig(i.type)) for i in reflected.imports]
    assert m.exports == {e.name: sig(e.type) for e in reflected.exports
                         if isinstance(e.type, wasmtime.FuncType)}
