"""wasm/runtime.py: calls, host functions, memory, traps, clones, the code cache, threads."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from wasmproxy.wasm import runtime as rt
from wasmproxy.wasm.runtime import (FuncSig, InvalidMemoryAccess, WasmLoadError, WasmTrap, WasmVm,
                                    compile_module)

WAT_DIR = Path(__file__).parent / "wat"


def wasm(name: str) -> bytes:
    return wasmtime.wat2wasm((WAT_DIR / name).read_text())


def basic_hosts(calls: list | None = None) -> dict:
    calls = calls if calls is not None else []
    return {
        ("env", "host_add"): lambda a, b: calls.append(("add", a, b)) or a * b,
        ("env", "host_log"): lambda p, n: calls.append(("log", p, n)),
        ("env", "host_i64"): lambda a, b: calls.append(("i64", a, b)) or b * 2,
        ("env", "host_void"): lambda: calls.append(("void",)),
    }


@pytest.fixture
def basic_vm() -> WasmVm:
    return WasmVm(compile_module(wasm("runtime_basic.wat"), name="basic"), basic_hosts())


def trap_vm(raise_fn=None, tick=lambda: None, **kw) -> WasmVm:
    hosts = {("env", "tick"): tick, ("env", "raise"): raise_fn or (lambda x: x)}
    return WasmVm(compile_module(wasm("runtime_traps.wat"), name="traps"), hosts, **kw)


# -- modules ---------------------------------------------------------------------------------


def test_module_describes_exports_imports_and_abi_version():
    m = compile_module(wasm("runtime_basic.wat"), name="basic")
    assert m.abi_version == "0.2.1"
    assert m.exports["add"] == FuncSig(("i32", "i32"), ("i32",))
    assert m.exports["swap"] == FuncSig(("i32", "i32"), ("i32", "i32"))
    assert ("env", "host_i64", FuncSig(("i32", "i64"), ("i64",))) in m.imports
    assert len(m.sha256) == 64
    assert compile_module(wasm("runtime_basic.wat")) is m  # compiled once per code hash


def test_module_without_abi_export_has_no_abi_version():
    assert compile_module(wasm("runtime_traps.wat")).abi_version is None


def test_invalid_module_names_the_plugin_and_the_problem():
    with pytest.raises(WasmLoadError, match="'my_plugin'.*magic header"):
        compile_module(b"not wasm at all", name="my_plugin")


def test_truncated_module_is_rejected():
    code = wasm("runtime_basic.wat")
    with pytest.raises(WasmLoadError, match="'cut'"):
        compile_module(code[: len(code) // 2], name="cut")


def test_missing_import_uses_cpp_host_wording():
    m = compile_module(wasm("runtime_missing_import.wat"))
    hosts = {("env", "proxy_log"): lambda a, b, c: 0}
    with pytest.raises(WasmLoadError) as e:
        WasmVm(m, hosts)
    assert str(e.value) == "Failed to load Wasm module due to a missing import: env.proxy_foo"


# -- calls into the guest --------------------------------------------------------------------


def test_i32_values_are_unsigned_and_wrap(basic_vm):
    add = basic_vm.get_function("add")
    assert add(2, 3) == 5
    assert add(-1, 0) == 0xFFFFFFFF
    assert add(0xFFFFFFFF, 1) == 0


def test_i64_f64_and_multi_value(basic_vm):
    assert basic_vm.get_function("add64")(-5, 2) == -3
    assert basic_vm.get_function("fmix")(2, 0.5) == 2.5
    assert basic_vm.get_function("swap")(1, 2) == (2, 1)


def test_wrong_argument_count_is_an_error_not_garbage(basic_vm):
    with pytest.raises((TypeError, ValueError)):
        basic_vm.get_function("add")(1)
    with pytest.raises(TypeError):
        basic_vm.get_function("fmix")(1)


def test_missing_export_is_none(basic_vm):
    assert basic_vm.get_function("nope") is None
    assert basic_vm.get_function("memory") is None


# -- host functions --------------------------------------------------------------------------


def test_host_functions_receive_raw_ints_and_return_results():
    calls: list = []
    vm = WasmVm(compile_module(wasm("runtime_basic.wat")), basic_hosts(calls))
    assert vm.get_function("call_host_add")(6, 7) == 42
    assert vm.get_function("call_host_i64")(-5) == -10
    assert vm.get_function("call_host_void")() is None
    vm.get_function("call_host_log")()
    assert calls == [("add", 6, 7), ("i64", 7, -5), ("void",), ("log", 16, 5)]


def test_host_function_raising_becomes_a_trap_with_the_python_error(monkeypatch):
    def bad(x):
        raise ValueError(f"bad value {x}")

    logged: list = []
    monkeypatch.setattr(rt.log, "error", lambda fmt, *args, **kw: logged.append(fmt % args))
    vm = trap_vm(raise_fn=bad)
    with pytest.raises(WasmTrap) as e:
        vm.get_function("call_raise")(3)
    assert e.value.message == "host function env.raise raised ValueError: bad value 3"
    assert e.value.trap_code is None
    assert [f.func_name for f in e.value.frames] == ["call_raise"]
    assert isinstance(e.value.__cause__, ValueError)
    assert logged == ["wasm vm 'traps': host function env.raise raised ValueError: bad value 3"]
    assert vm.get_function("ok")() == 42  # the VM itself still works; failing it is the host's call


def test_host_function_returning_none_for_a_result_traps():
    vm = trap_vm(raise_fn=lambda x: None)
    with pytest.raises(WasmTrap, match="env.raise"):
        vm.get_function("call_raise")(1)


@pytest.mark.parametrize("data", [b"response body", bytes(range(256)) * 1000])
def test_host_function_can_reenter_the_guest(data):
    """cpp-host allocates returned buffers by calling the plugin's malloc from a host call;
    the large case makes malloc grow memory in the middle of the host call."""
    box: dict = {}

    def get_buffer(ptr_out, size_out):
        vm = box["vm"]
        p = vm.get_function("malloc")(len(data))
        vm.memory.write(p, data)
        vm.memory.write_u32(ptr_out, p)
        vm.memory.write_u32(size_out, len(data))
        return 0

    vm = box["vm"] = WasmVm(compile_module(wasm("runtime_reentrant.wat")),
                            {("env", "get_buffer"): get_buffer})
    assert vm.get_function("fetch")() == 0
    p, n = vm.memory.read_u32(8), vm.memory.read_u32(12)
    assert (p, vm.memory.read(p, n)) == (1024, data)
    assert vm.get_function("fetch")() == 0
    assert vm.memory.read_u32(8) == 1024 + len(data)
    assert vm.memory.size() >= 1024 + 2 * len(data)


def test_caller_context_is_the_store_context():
    """runtime.py calls back into a VM with the Store's context from inside a host call; this
    is sound because wasmtime hands the host function that very context (pinned here)."""
    store = wasmtime.Store(rt.engine())
    seen = []

    def host(caller):
        seen.append(rt._context_address(caller._context()))

    ty = wasmtime.FuncType([], [])
    func = wasmtime.Func(store, ty, host, access_caller=True)
    module = wasmtime.Module(rt.engine(), '(module (import "" "f" (func $f)) (func (export "g") call $f))')
    inst = wasmtime.Instance(store, module, [func])
    store.set_epoch_deadline(1 << 40)
    inst.exports(store)["g"](store)
    assert seen == [rt._context_address(store._context())]


# -- memory ----------------------------------------------------------------------------------


def test_memory_read_write_and_integers(basic_vm):
    mem = basic_vm.memory
    assert mem.read(16, 5) == b"hello"
    mem.write(100, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert mem.read_u32(100) == 0x04030201
    assert mem.read_u64(100) == 0x0807060504030201
    mem.write_u32(200, 0xDEADBEEF)
    assert basic_vm.get_function("load32")(200) == 0xDEADBEEF
    basic_vm.get_function("store32")(300, 0x12345678)
    assert mem.read_u32(300) == 0x12345678
    mem.write_u64(400, -1)
    assert mem.read_u64(400) == 0xFFFFFFFFFFFFFFFF
    mem.write(500, b"abc\0def")
    assert mem.read_cstr(500) == b"abc"
    assert mem.size() == 65536


@pytest.mark.parametrize("op", [
    lambda m: m.read(65536 - 2, 4),
    lambda m: m.read(-1, 1),
    lambda m: m.read(0, -1),
    lambda m: m.write(65535, b"ab"),
    lambda m: m.read_u32(65533),
    lambda m: m.write_u32(1 << 32, 0),
    lambda m: m.read_u64(65530),
    lambda m: m.write_u64(65529, 1),
    lambda m: m.read_cstr(65536),
])
def test_out_of_bounds_access_raises(basic_vm, op):
    with pytest.raises(InvalidMemoryAccess):
        op(basic_vm.memory)


def test_cstr_without_terminator_is_invalid(basic_vm):
    basic_vm.memory.write(65536 - 3, b"abc")
    with pytest.raises(InvalidMemoryAccess):
        basic_vm.memory.read_cstr(65536 - 3)


def test_memory_growth_is_seen_by_the_next_access(basic_vm):
    mem = basic_vm.memory
    assert mem.read(0, 1) == b"\0"  # view cached at one page
    assert basic_vm.get_function("grow")(2) == 1
    assert mem.read(3 * 65536 - 1, 1) == b"Z"  # written by the guest after growing
    mem.write(2 * 65536, b"new page")
    assert mem.read(2 * 65536, 8) == b"new page"
    with pytest.raises(InvalidMemoryAccess):
        mem.read(3 * 65536, 1)


def test_memory_limit_makes_grow_fail():
    vm = WasmVm(compile_module(wasm("runtime_basic.wat")), basic_hosts(),
                memory_limit_bytes=2 * 65536)
    grow = vm.get_function("grow")
    assert grow(1) == 1
    assert grow(1) == 0xFFFFFFFF  # -1: over the limit
    assert vm.memory.size() == 2 * 65536


# -- traps -----------------------------------------------------------------------------------


def test_unreachable_trap_has_code_and_named_backtrace():
    with pytest.raises(WasmTrap) as e:
        trap_vm().get_function("do_unreachable")()
    t = e.value
    assert t.trap_code == "unreachable"
    assert "unreachable" in t.message
    assert [f.func_name for f in t.frames] == ["inner_unreachable", "do_unreachable"]
    assert "inner_unreachable" in str(t)


@pytest.mark.parametrize("export,args,code,message", [
    # Messages are V8's, as Envoy 1.40 logs them.
    ("div", (1, 0), "integer_division_by_zero", "Uncaught RuntimeError: divide by zero"),
    ("rem", (1, 0), "integer_division_by_zero", "Uncaught RuntimeError: remainder by zero"),
    ("div", (-0x80000000, -1), "integer_overflow",
     "Uncaught RuntimeError: divide result unrepresentable"),
    ("trunc", (float("nan"),), "bad_conversion_to_integer",
     "Uncaught RuntimeError: float unrepresentable in integer range"),
    ("recurse", (0,), "stack_overflow", "Uncaught RangeError: Maximum call stack size exceeded"),
    ("oob", (), "memory_out_of_bounds", "Uncaught RuntimeError: memory access out of bounds"),
    ("indirect", (0,), "indirect_call_to_null", "Uncaught RuntimeError: function signature mismatch"),
    ("indirect", (1,), "bad_signature", "Uncaught RuntimeError: function signature mismatch"),
    ("indirect", (5,), "table_out_of_bounds", "Uncaught RuntimeError: table index is out of bounds"),
])
def test_guest_traps(export, args, code, message):
    vm = trap_vm()
    with pytest.raises(WasmTrap) as e:
        vm.get_function(export)(*args)
    assert (e.value.trap_code, e.value.message) == (code, message)
    assert e.value.detail  # wasmtime's own words
    assert vm.get_function("ok")() == 42


def test_trap_text_has_envoys_backtrace_format():
    with pytest.raises(WasmTrap) as e:
        trap_vm().get_function("do_unreachable")()
    lines = str(e.value).splitlines()
    assert lines[:2] == ["Uncaught RuntimeError: unreachable", "Proxy-Wasm plugin in-VM backtrace:"]
    assert lines[2].startswith("  0:  0x") and lines[2].endswith(" - inner_unreachable")
    assert lines[3].startswith("  1:  0x") and lines[3].endswith(" - do_unreachable")


def test_trap_without_name_section_has_no_backtrace_text():
    code = wasmtime.wat2wasm('(module (func (export "f") unreachable))')
    with pytest.raises(WasmTrap) as e:
        WasmVm(compile_module(code), {}).get_function("f")()
    assert str(e.value) == "Uncaught RuntimeError: unreachable"
    assert len(e.value.frames) == 1


def test_epoch_deadline_interrupts_a_spinning_guest_and_is_rearmed():
    # The guest calls the host each round; the host advances the epoch, so this is deterministic.
    vm = trap_vm(tick=rt.engine_tick, epoch_deadline_ticks=2)
    spin = vm.get_function("spin")
    with pytest.raises(WasmTrap) as e:
        spin()
    assert e.value.trap_code == "interrupt"
    # Re-armed before the next entry: a short call after the trap succeeds.
    assert vm.get_function("ok")() == 42
    with pytest.raises(WasmTrap, match="interrupt"):
        spin()


def test_each_outermost_entry_gets_the_full_deadline_whether_or_not_the_epoch_moved():
    """Re-armed at every outermost entry, with or without ticks since the last one: a spinning
    guest always gets exactly its 2 ticks."""
    ticks = [0]

    def tick():
        ticks[0] += 1
        rt.engine_tick()

    vm = trap_vm(tick=tick, epoch_deadline_ticks=2)
    ok, spin = vm.get_function("ok"), vm.get_function("spin")
    for between in (0, 1, 0, 3, 0):
        assert ok() == 42
        for _ in range(between):
            rt.engine_tick()
        ticks[0] = 0
        with pytest.raises(WasmTrap, match="interrupt"):
            spin()
        assert ticks[0] == 2


def test_without_deadline_ticks_never_interrupt():
    ticks = [0]

    def tick():
        rt.engine_tick()
        ticks[0] += 1
        if ticks[0] == 50:
            raise RuntimeError("stop spinning")

    vm = trap_vm(tick=tick)
    with pytest.raises(WasmTrap, match="stop spinning"):
        vm.get_function("spin")()
    assert ticks[0] == 50


def test_nested_entry_does_not_extend_the_deadline():
    """Only the outermost entry re-arms: a guest looping through re-entrant calls still stops."""
    box: dict = {}

    def tick():
        rt.engine_tick()
        box["vm"].get_function("ok")()

    vm = box["vm"] = trap_vm(tick=tick, epoch_deadline_ticks=3)
    with pytest.raises(WasmTrap, match="interrupt"):
        vm.get_function("spin")()


def test_epoch_ticker_interrupts_without_host_calls():
    vm = trap_vm(epoch_deadline_ticks=2)
    ticker = rt.EpochTicker(0.001).start()
    try:
        with pytest.raises(WasmTrap, match="interrupt"):
            vm.get_function("spin")()
    finally:
        ticker.stop()


def test_a_guest_with_a_deadline_keeps_the_gil_between_host_calls():
    """No thread switch per guest entry or host call: another Python thread that wants the GIL
    does not run while the guest runs (the ticker, a native timer, needs no GIL: see
    test_epoch_ticker_interrupts_without_host_calls)."""
    count, seen, stop, started = [0], [], threading.Event(), threading.Event()

    def tick() -> None:
        seen.append(count[0])
        if len(seen) == 50:
            raise RuntimeError("enough")

    def other_python_thread() -> None:
        started.set()
        while not stop.is_set():
            count[0] += 1

    vm = trap_vm(tick=tick, epoch_deadline_ticks=1000)
    interval = sys.getswitchinterval()
    thread = threading.Thread(target=other_python_thread)
    try:
        sys.setswitchinterval(0.05)  # longer than the 50 host calls take
        thread.start()
        assert started.wait(10)
        with pytest.raises(WasmTrap, match="enough"):
            vm.get_function("spin")()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join()
    assert len(set(seen)) == 1  # the other thread never ran between two host calls


# -- clones ----------------------------------------------------------------------------------


def test_clone_has_its_own_store_globals_and_memory(basic_vm):
    incr = basic_vm.get_function("incr")
    incr(), incr()
    basic_vm.memory.write(1000, b"base")
    clone = basic_vm.clone()
    assert clone._store is not basic_vm._store
    assert clone.get_function("incr")() == 1
    assert incr() == 3
    assert clone.memory.read(1000, 4) == b"\0\0\0\0"
    clone.memory.write(1000, b"copy")
    assert basic_vm.memory.read(1000, 4) == b"base"


def test_clone_can_take_new_host_functions():
    calls_a: list = []
    calls_b: list = []
    a = WasmVm(compile_module(wasm("runtime_basic.wat")), basic_hosts(calls_a))
    b = a.clone(basic_hosts(calls_b))
    b.get_function("call_host_void")()
    assert (calls_a, calls_b) == ([], [("void",)])


# -- precompiled code cache ------------------------------------------------------------------


def unique_code(tag: str) -> bytes:
    """A module whose hash no other test shares (the process-wide cache is keyed by it)."""
    return wasmtime.wat2wasm(f'(module (func (export "f") (result i32) i32.const 7)'
                             f' (data (memory 0) (i32.const 0) "{tag}") (memory 1))')


def test_disk_cache_miss_then_hit(tmp_path, monkeypatch):
    code = unique_code(f"hit-{os.getpid()}-{tmp_path.name}")
    first = compile_module(code, cache_dir=str(tmp_path))
    assert not first.from_disk_cache
    [entry] = list(tmp_path.glob("*.cwasm"))
    assert entry.name.startswith(first.sha256)

    monkeypatch.setattr(rt, "_modules", {})  # a fresh process, as far as compile_module knows

    def no_compiling(*a, **k):
        raise AssertionError("compiled instead of using the cache")

    monkeypatch.setattr(wasmtime.Module, "__init__", no_compiling)
    second = compile_module(code, cache_dir=str(tmp_path))
    assert second.from_disk_cache
    assert WasmVm(second, {}).get_function("f")() == 7


@pytest.mark.parametrize("corruption", [
    lambda b: b[:-10],
    lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:],
    lambda b: b"garbage",
    lambda b: b"",
])
def test_corrupt_cache_entry_is_ignored_and_rewritten(tmp_path, monkeypatch, corruption):
    code = unique_code(f"corrupt-{tmp_path.name}")
    compile_module(code, cache_dir=str(tmp_path))
    [entry] = list(tmp_path.glob("*.cwasm"))
    good = entry.read_bytes()
    entry.write_bytes(corruption(good))
    monkeypatch.setattr(rt, "_modules", {})
    m = compile_module(code, cache_dir=str(tmp_path))
    assert not m.from_disk_cache
    assert WasmVm(m, {}).get_function("f")() == 7
    assert entry.read_bytes()[:len(rt._CACHE_MAGIC)] == rt._CACHE_MAGIC
    monkeypatch.setattr(rt, "_modules", {})
    assert compile_module(code, cache_dir=str(tmp_path)).from_disk_cache


# -- threads ---------------------------------------------------------------------------------


def test_two_vms_of_one_module_run_concurrently_on_two_threads():
    module = compile_module(wasm("runtime_basic.wat"))
    barrier = threading.Barrier(2)
    results: dict = {}

    def worker(tag: int) -> None:
        seen: list = []
        vm = WasmVm(module, basic_hosts(seen), name=f"w{tag}")
        barrier.wait(timeout=10)
        call = vm.get_function("call_host_add")
        incr = vm.get_function("incr")
        total = 0
        for i in range(2000):
            total += call(tag, i)
            incr()
        results[tag] = (total, incr(), len(seen))

    threads = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = sum(range(2000))
    assert results == {1: (expected, 2001, 2000), 2: (2 * expected, 2001, 2000)}


def test_vm_refuses_calls_from_another_thread(basic_vm):
    add = basic_vm.get_function("add")
    errors: list = []

    def other() -> None:
        try:
            add(1, 2)
        except AssertionError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=10)
    assert len(errors) == 1 and "thread" in str(errors[0])


def test_clone_made_on_a_worker_belongs_to_that_worker(basic_vm):
    out: list = []
    t = threading.Thread(target=lambda: out.append(basic_vm.clone().get_function("add")(2, 2)))
    t.start()
    t.join(timeout=10)
    assert out == [4]


# -- edges -----------------------------------------------------------------------------------


def test_start_section_trap_is_a_wasm_trap():
    code = wasmtime.wat2wasm('(module (func $s unreachable) (start $s))')
    with pytest.raises(WasmTrap) as e:
        WasmVm(compile_module(code), {})
    assert e.value.trap_code == "unreachable"


def test_module_without_memory_rejects_every_access():
    vm = WasmVm(compile_module(wasmtime.wat2wasm('(module (func (export "f")))')), {})
    assert vm.memory.size() == 0
    with pytest.raises(InvalidMemoryAccess):
        vm.memory.read(0, 1)
    with pytest.raises(InvalidMemoryAccess):
        vm.memory.write_u32(0, 1)


def test_keyboard_interrupt_in_a_host_function_is_not_wrapped():
    def interrupt(x):
        raise KeyboardInterrupt

    vm = trap_vm(raise_fn=interrupt)
    with pytest.raises(KeyboardInterrupt):
        vm.get_function("call_raise")(1)
    assert vm.get_function("call_raise") is not None
    assert vm.get_function("ok")() == 42


def test_trap_inside_a_reentrant_call_fails_the_outer_call_too():
    box: dict = {}

    def raise_fn(x):
        box["vm"].get_function("do_unreachable")()  # raises WasmTrap inside the host call
        return 0

    vm = box["vm"] = trap_vm(raise_fn=raise_fn)
    with pytest.raises(WasmTrap) as e:
        vm.get_function("call_raise")(1)
    t = e.value
    assert (t.message, t.trap_code) == ("Uncaught RuntimeError: unreachable", "unreachable")
    assert [f.func_name for f in t.frames] == [
        "inner_unreachable", "do_unreachable", "call_raise"]
    assert isinstance(t.__cause__, WasmTrap)
    assert vm.get_function("ok")() == 42


def test_mixed_i32_i64_host_call_sees_unsigned_i32_and_signed_i64():
    code = wasmtime.wat2wasm('''(module
      (import "env" "m" (func $m (param i32 i64 i32) (result i64)))
      (import "env" "f" (func $f (param f64 i32) (result f32)))
      (func (export "call_m") (param i32 i64 i32) (result i64)
        local.get 0 local.get 1 local.get 2 call $m)
      (func (export "call_f") (param f64 i32) (result f32) local.get 0 local.get 1 call $f))''')
    seen = []
    vm = WasmVm(compile_module(code), {
        ("env", "m"): lambda a, b, c: seen.append((a, b, c)) or b - 1,
        ("env", "f"): lambda x, n: x * n})
    assert vm.get_function("call_m")(-1, -(1 << 63), 7) == (1 << 63) - 1  # wraps in i64
    assert seen == [(0xFFFFFFFF, -(1 << 63), 7)]
    assert vm.get_function("call_f")(1.5, 3) == 4.5


def test_deadline_interrupts_spinning_guests_on_two_threads_at_once():
    module = compile_module(wasm("runtime_traps.wat"))
    barrier = threading.Barrier(2)
    codes: dict = {}

    def worker(tag: int) -> None:
        vm = WasmVm(module, {("env", "tick"): lambda: None, ("env", "raise"): lambda x: x},
                    epoch_deadline_ticks=2)
        barrier.wait(timeout=10)
        try:
            vm.get_function("spin")()
        except WasmTrap as e:
            codes[tag] = e.trap_code

    ticker = rt.EpochTicker(0.001).start()
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        ticker.stop()
    assert codes == {1: "interrupt", 2: "interrupt"}


def test_declared_signature_mismatch_uses_envoys_wording():
    code = wasmtime.wat2wasm('(module (import "env" "proxy_done" (func (param i32))))')
    done = rt.with_signature(lambda: 0, (), ("i32",))
    with pytest.raises(WasmLoadError) as e:
        WasmVm(compile_module(code), {("env", "proxy_done"): done})
    assert str(e.value) == ("Failed to load Wasm module due to an import type mismatch: "
                            "env.proxy_done, want: i32 -> void, but host exports: void -> i32")
    ok = rt.with_signature(lambda x: None, ("i32",), ())
    WasmVm(compile_module(code), {("env", "proxy_done"): ok})


def test_signature_declared_on_a_method_is_seen_through_the_bound_method():
    class Host:
        def done(self) -> int:
            return 0
        rt.with_signature(done, (), ("i32",))

    code = wasmtime.wat2wasm('(module (import "env" "proxy_done" (func (param i32))))')
    with pytest.raises(WasmLoadError, match="import type mismatch"):
        WasmVm(compile_module(code), {("env", "proxy_done"): Host().done})


def test_memory_and_table_imports_are_provided_global_imports_are_missing():
    code = wasmtime.wat2wasm('''(module (import "env" "memory" (memory 2))
      (import "env" "table" (table 1 funcref))
      (func (export "store") (param i32 i32) local.get 0 local.get 1 i32.store))''')
    vm = WasmVm(compile_module(code), {})
    vm.get_function("store")(65536 + 8, 99)
    assert vm.memory.size() == 2 * 65536 and vm.memory.read_u32(65536 + 8) == 99
    code = wasmtime.wat2wasm('(module (import "env" "g" (global i32)))')
    with pytest.raises(WasmLoadError) as e:
        WasmVm(compile_module(code), {})
    assert str(e.value) == "Failed to load Wasm module due to a missing import: env.g"


def test_imported_memory_over_the_limit_is_a_load_error():
    code = wasmtime.wat2wasm('(module (import "env" "memory" (memory 4)))')
    with pytest.raises(WasmLoadError, match="env.memory"):
        WasmVm(compile_module(code), {}, memory_limit_bytes=65536)


def test_process_cache_releases_modules_no_longer_used():
    import gc
    import weakref
    code = unique_code("released")
    ref = weakref.ref(compile_module(code))
    gc.collect()
    assert ref() is None
    m = compile_module(code)
    assert compile_module(code) is m


# -- bounds checking, as a property ----------------------------------------------------------

_PAGE = 65536
_bounds_vm: list = []


def _vm_for_bounds() -> WasmVm:
    # One VM for all examples (hypothesis forbids function-scoped fixtures); grown to 2 pages.
    if not _bounds_vm:
        vm = WasmVm(compile_module(wasm("runtime_basic.wat")), basic_hosts())
        vm.get_function("grow")(1)
        _bounds_vm.append(vm)
    return _bounds_vm[0]


@settings(max_examples=300, deadline=None)
@given(ptr=st.integers(-10, 3 * _PAGE), n=st.integers(-5, 2 * _PAGE + 10))
def test_every_access_is_valid_exactly_when_inside_current_memory(ptr, n):
    vm = _vm_for_bounds()
    size = vm.memory.size()
    inside = 0 <= ptr and 0 <= n and ptr + n <= size
    try:
        data = vm.memory.read(ptr, n)
    except InvalidMemoryAccess:
        assert not inside
    else:
        assert inside and len(data) == n
    try:
        vm.memory.write_u32(ptr, 1)
    except InvalidMemoryAccess:
        assert not (0 <= ptr and ptr + 4 <= size)
    else:
        assert 0 <= ptr and ptr + 4 <= size


def test_host_function_with_several_results():
    code = wasmtime.wat2wasm('''(module
      (import "env" "pair" (func $p (param i32) (result i32 i64)))
      (func (export "sum") (param i32) (result i64) (local $b i64)
        local.get 0 call $p local.set $b i64.extend_i32_u local.get $b i64.add))''')
    vm = WasmVm(compile_module(code), {("env", "pair"): lambda x: (x, -1)})
    assert vm.get_function("sum")(5) == 4


def test_export_with_an_unsupported_type_is_a_load_error():
    code = wasmtime.wat2wasm('(module (func (export "f") (param v128)))')
    vm = WasmVm(compile_module(code), {})
    with pytest.raises(WasmLoadError, match="unsupported type v128"):
        vm.get_function("f")


def test_import_with_an_unsupported_type_is_a_load_error():
    code = wasmtime.wat2wasm('(module (import "env" "g" (func (result v128))))')
    with pytest.raises(WasmLoadError, match="unsupported type v128"):
        WasmVm(compile_module(code), {("env", "g"): lambda: 0})


# -- signatures come from the binary, never from wasmtime's (aborting) reflection -----------


def reflected(code: bytes) -> tuple[list, dict]:
    """What wasmtime's type reflection says (only safe for plain types)."""
    m = wasmtime.Module(rt.engine(), code)
    sig = lambda ft: FuncSig(tuple(map(str, ft.params)), tuple(map(str, ft.results)))  # noqa: E731
    imports = [(i.module, i.name, sig(i.type)) for i in m.imports
               if isinstance(i.type, wasmtime.FuncType)]
    exports = {e.name: sig(e.type) for e in m.exports if isinstance(e.type, wasmtime.FuncType)}
    return imports, exports


@pytest.mark.parametrize("fixture", sorted(p.name for p in WAT_DIR.glob("*.wat")))
def test_signatures_read_from_the_binary_match_wasmtime(fixture):
    code = wasm(fixture)
    m = compile_module(code)
    assert (m.imports, m.exports) == reflected(code)


def test_typed_reference_import_is_rejected_instead_of_aborting():
    code = wasmtime.wat2wasm('(module (import "env" "f" (func (param (ref func)))))')
    with pytest.raises(WasmLoadError, match="import env.f uses a typed or GC reference type"):
        compile_module(code, name="gc")


def test_gc_type_definitions_keep_type_indices_right():
    code = wasmtime.wat2wasm('''(module
      (type $s (struct (field i32)))
      (rec (type $a (array i8)) (type $f (func (param i32) (result i32))))
      (func (export "plain") (param i64) (result i64) local.get 0)
      (func (export "typed") (type $f) local.get 0))''')
    m = compile_module(code)
    assert m.exports["plain"] == FuncSig(("i64",), ("i64",))
    assert m.exports["typed"] == FuncSig(("i32",), ("i32",))
    vm = WasmVm(m, {})
    assert vm.get_function("plain")(-3) == -3
    assert vm.get_function("typed")(7) == 7
