"""Microbenchmark: wasmproxy's fast wasm path vs wasmtime-py's convenient API.

Run: python bench/micro/bench_runtime.py [--quick]
Prints microseconds per operation (best of several repeats) and the speed-up. A benchmark, not a
test: numbers depend on the machine and its load. Targets: <= 1 us per host call and <= 3 us per
callback (one entry into the guest that makes one host call).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
from wasmproxy.wasm import runtime as rt  # noqa: E402

WAT = """
(module
  (import "env" "h" (func $h (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "nop"))
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  ;; a "callback": like proxy_on_request_headers making one host call
  (func (export "callback") (param i32 i32 i32) (result i32) local.get 0 local.get 1 call $h)
  ;; n host calls inside one entry, to time a host call alone
  (func (export "host_loop") (param i32) (local i32)
    (loop $l
      local.get 1 local.get 0 call $h drop
      local.get 1 i32.const 1 i32.add local.tee 1
      local.get 0 i32.lt_u br_if $l))
)
"""


def host(a: int, b: int) -> int:
    return 0


def best_us(fn, number: int, per: int = 1, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number / per * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    loop_n = 1000

    code = wasmtime.wat2wasm(WAT)
    module = rt.compile_module(code, name="bench")

    # wasmproxy fast path
    vm = rt.WasmVm(module, {("env", "h"): host})
    nop, add = vm.get_function("nop"), vm.get_function("add")
    cb, loop = vm.get_function("callback"), vm.get_function("host_loop")
    mem = vm.memory
    payload = b"x" * 64

    # wasmtime-py convenient path, same engine and module
    store = wasmtime.Store(rt.engine())
    store.set_epoch_deadline(1 << 62)
    hfunc = wasmtime.Func(store, wasmtime.FuncType([wasmtime.ValType.i32()] * 2,
                                                   [wasmtime.ValType.i32()]), host)
    inst = wasmtime.Instance(store, module._module, [hfunc])
    ex = inst.exports(store)
    p_nop, p_add, p_cb, p_loop = ex["nop"], ex["add"], ex["callback"], ex["host_loop"]
    p_mem = ex["memory"]

    def new_vm_py() -> None:
        s = wasmtime.Store(rt.engine())
        f = wasmtime.Func(s, wasmtime.FuncType([wasmtime.ValType.i32()] * 2,
                                               [wasmtime.ValType.i32()]), host)
        wasmtime.Instance(s, module._module, [f])

    rows = [
        ("call export, no args", lambda: nop(), lambda: p_nop(store), n, 1),
        ("call export (i32,i32)->i32", lambda: add(1, 2), lambda: p_add(store, 1, 2), n, 1),
        ("host call (inside one entry)", lambda: loop(loop_n), lambda: p_loop(store, loop_n),
         max(10, n // loop_n), loop_n),
        ("callback = entry + 1 host call", lambda: cb(1, 2, 3), lambda: p_cb(store, 1, 2, 3), n, 1),
        ("memory read 64 B", lambda: mem.read(100, 64), lambda: p_mem.read(store, 100, 164), n, 1),
        ("memory write 64 B", lambda: mem.write(100, payload),
         lambda: p_mem.write(store, payload, 100), n, 1),
        ("memory write u32", lambda: mem.write_u32(100, 7),
         lambda: p_mem.write(store, (7).to_bytes(4, "little"), 100), n, 1),
        ("new VM (Store + Instance)", lambda: vm.clone(), new_vm_py, max(50, n // 100), 1),
    ]
    print(f"{'operation':34} {'fast us':>9} {'wasmtime-py us':>15} {'speed-up':>9}")
    for label, fast, slow, number, per in rows:
        f_us = best_us(fast, number, per)
        s_us = best_us(slow, max(1, number // 5), per)
        print(f"{label:34} {f_us:9.3f} {s_us:15.3f} {s_us / f_us:8.1f}x")


if __name__ == "__main__":
    main()
