"""Microbenchmark: the per-stream and per-worker costs of a Wasm HTTP filter.

Run: python bench/micro/bench_lifecycle.py [--quick] [--plugin headers]
Prints, for plugins/out/<plugin>.wasm:

* one full stream (request headers -> upstream, response headers -> downstream, log, destroy)
  through the real FilterManager and wasm/http_filter.py, socket-free (the harness of
  tests/test_wasm_http_filter.py), with and without the filter: the difference is what the
  filter costs per request;
* VM clone: a bare WasmVm.clone() (Store + Instance), and a worker clone as the proxy makes it
  (Wasm.clone + initialize + start + configure of the plugin);
* module load: compile from bytes, and from the precompiled disk cache (allow_precompiled);
* memory per worker clone: RSS growth per live clone, against the module's linear memory size
  (target <= 2x).

A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tests.wasm_filter_support import (  # noqa: E402
    FakeDispatcher, Stream, factory_context, http_wasm, plugin_config, plugin_path)
from wasmproxy.wasm import runtime as rt  # noqa: E402
from wasmproxy.wasm.context import Plugin  # noqa: E402
from wasmproxy.wasm.http_filter import create_wasm_filter_factory  # noqa: E402
from wasmproxy.wasm.wasm import Wasm  # noqa: E402

HEADERS_CONFIG = ("request_headers add request_headers x-bench-request 1\n"
                  "response_headers add response_headers x-bench-response 1")


def best_us(fn, number: int, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_stream(factories: list) -> None:  # type: ignore[type-arg]
    s = Stream(factories)
    s.request([("user-agent", "bench"), ("accept", "*/*")])
    s.respond(200, [("content-type", "text/plain"), ("content-length", "5")], b"hello")
    s.finish()


def stream_costs(plugin: str, configuration: str, root_id: str, n: int) -> tuple[float, float]:
    """(us per stream without a filter, us per stream with the Wasm filter)."""
    dispatcher = FakeDispatcher()
    factory = create_wasm_filter_factory(
        http_wasm(plugin_config(plugin, configuration, root_id=root_id, vm_id=f"bench-{plugin}")),
        factory_context(dispatcher))
    check = Stream([factory])
    check.request([])
    check.respond(200)
    assert check.downstream.status == 200, "the filter did not pass the stream"
    check.finish()
    return best_us(lambda: one_stream([]), n), best_us(lambda: one_stream([factory]), n)


def base_wasm(module: rt.WasmModule, plugin: Plugin) -> Wasm:
    wasm = Wasm(module, post=lambda cb: None, vm_id=plugin.vm_id, vm_key=f"bench-{module.sha256}")
    assert wasm.initialize(), wasm.fail_message
    return wasm


def worker_clone(base: Wasm, plugin: Plugin) -> Wasm:
    """What get_or_create_thread_local_plugin does on a worker's first request."""
    wasm = base.clone(post=lambda cb: None)
    assert wasm.initialize(), wasm.fail_message
    root = wasm.start(plugin)
    assert root is not None and wasm.configure(root, plugin), wasm.fail_message
    return wasm


def module_load_ms(code: bytes, repeat: int) -> tuple[float, float]:
    """(ms to compile from bytes, ms to load from the precompiled cache); process cache bypassed."""
    def load(cache_dir: str | None) -> float:
        start = time.perf_counter()
        module = rt.compile_module(code, cache_dir=cache_dir, name="bench")
        took = time.perf_counter() - start
        assert module.from_disk_cache == (cache_dir is not None and warm)
        del module
        gc.collect()  # the process-wide module cache is weak: the next load starts cold
        return took * 1e3

    warm = False
    compile_ms = min(load(None) for _ in range(repeat))
    with tempfile.TemporaryDirectory(prefix="wasmproxy-bench-cache-") as cache:
        load(cache)  # writes the cache entry
        warm = True
        cached_ms = min(load(cache) for _ in range(repeat))
    return compile_ms, cached_ms


def memory_per_clone(base: Wasm, plugin: Plugin, clones: int) -> tuple[float, int]:
    """(KiB of RSS per live worker clone, bytes of the clone's linear memory)."""
    keep = [worker_clone(base, plugin)]  # first one outside the measurement (lazy imports, caches)
    gc.collect()
    before = rss_kib()
    keep += [worker_clone(base, plugin) for _ in range(clones)]
    gc.collect()
    per_clone = (rss_kib() - before) / clones
    assert keep[-1].vm is not None
    return per_clone, keep[-1].vm.memory.size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--plugin", default="headers", help="plugins/out/<name>.wasm (default headers)")
    args = ap.parse_args()
    n = 300 if args.quick else 2000
    configuration, root_id = (HEADERS_CONFIG, "") if args.plugin == "headers" else ("bench", "")
    if args.plugin == "as_header":
        root_id = "as_header"

    code = Path(plugin_path(args.plugin)).read_bytes()
    compile_ms, cached_ms = module_load_ms(code, 3 if args.quick else 5)  # first: nothing holds the module yet
    bare_us, filtered_us = stream_costs(args.plugin, configuration, root_id, n)

    plugin = Plugin(name="bench", root_id=root_id, vm_id="bench", plugin_configuration=configuration.encode())
    module = rt.compile_module(code, name=args.plugin)
    base = base_wasm(module, plugin)
    assert base.vm is not None
    vm_clone_us = best_us(base.vm.clone, max(20, n // 10))
    worker_clone_us = best_us(lambda: worker_clone(base, plugin), max(20, n // 10))
    per_clone_kib, linear = memory_per_clone(base, plugin, 20 if args.quick else 50)

    print(f"plugin plugins/out/{args.plugin}.wasm ({len(code)} bytes)")
    print(f"{'stream, no filter (FilterManager only)':48} {bare_us:9.1f} us")
    print(f"{'stream, with the Wasm filter':48} {filtered_us:9.1f} us")
    print(f"{'  => the Wasm filter per stream':48} {filtered_us - bare_us:9.1f} us")
    print(f"{'VM clone (WasmVm.clone: Store + Instance)':48} {vm_clone_us:9.1f} us")
    print(f"{'worker clone (clone+initialize+start+configure)':48} {worker_clone_us:9.1f} us")
    print(f"{'module load, compile from bytes':48} {compile_ms:9.2f} ms")
    print(f"{'module load, precompiled disk cache':48} {cached_ms:9.2f} ms")
    print(f"{'memory per worker clone (RSS growth)':48} {per_clone_kib:9.1f} KiB")
    print(f"{'  linear memory of a clone':48} {linear / 1024:9.1f} KiB"
          f"  (ratio {per_clone_kib * 1024 / linear:.2f}x, target <= 2x)")


if __name__ == "__main__":
    main()
