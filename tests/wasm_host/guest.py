"""A tiny WAT guest that forwards to every host function, and a harness to drive it.

The guest exports ``t_<host function>`` wrappers with the import's exact signature, so a
test calls any host call with raw pointers it chose (including bad ones). Every plugin
callback (``proxy_on_*``) calls the import ``test.event(code, a, b, c)`` and returns what the
test's handler returns, so tests script the plugin in Python. Memory: 4 pages; 1024..32767
is scratch for tests, ``malloc`` bump-allocates from 32768.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import wasmtime

from wasmproxy.wasm.abi import AbiVersion
from wasmproxy.wasm.context import ContextBase, Plugin
from wasmproxy.wasm.runtime import compile_module
from wasmproxy.wasm.wasm import Wasm

SCRATCH = 1024
HEAP = 32768
BAD_PTR = 0xFFFF_FF00  # far outside the 4-page memory

# name -> (params, has_result); all i32 unless "I" (i64).
HOST_SIGS: dict[str, tuple[str, bool]] = {
    "proxy_log": ("iii", True),
    "proxy_get_log_level": ("i", True),
    "proxy_get_current_time_nanoseconds": ("i", True),
    "proxy_set_tick_period_milliseconds": ("i", True),
    "proxy_set_effective_context": ("i", True),
    "proxy_done": ("", True),
    "proxy_get_buffer_bytes": ("iiiii", True),
    "proxy_set_buffer_bytes": ("iiiii", True),
    "proxy_get_buffer_status": ("iii", True),
    "proxy_get_header_map_size": ("ii", True),
    "proxy_get_header_map_pairs": ("iii", True),
    "proxy_set_header_map_pairs": ("iii", True),
    "proxy_get_header_map_value": ("iiiii", True),
    "proxy_add_header_map_value": ("iiiii", True),
    "proxy_replace_header_map_value": ("iiiii", True),
    "proxy_remove_header_map_value": ("iii", True),
    "proxy_continue_stream": ("i", True),
    "proxy_close_stream": ("i", True),
    "proxy_get_status": ("iii", True),
    "proxy_send_local_response": ("iiiiiiii", True),
    "proxy_http_call": ("iiiiiiiiii", True),
    "proxy_grpc_call": ("iiiiiiiiiiii", True),
    "proxy_grpc_stream": ("iiiiiiiii", True),
    "proxy_grpc_send": ("iiii", True),
    "proxy_grpc_cancel": ("i", True),
    "proxy_grpc_close": ("i", True),
    "proxy_set_shared_data": ("iiiii", True),
    "proxy_get_shared_data": ("iiiii", True),
    "proxy_register_shared_queue": ("iii", True),
    "proxy_resolve_shared_queue": ("iiiii", True),
    "proxy_enqueue_shared_queue": ("iii", True),
    "proxy_dequeue_shared_queue": ("iii", True),
    "proxy_define_metric": ("iiii", True),
    "proxy_record_metric": ("iI", True),
    "proxy_increment_metric": ("iI", True),
    "proxy_get_metric": ("ii", True),
    "proxy_get_property": ("iiii", True),
    "proxy_set_property": ("iiii", True),
    "proxy_call_foreign_function": ("iiiiii", True),
    "envoy_resolve_dns": ("iii", True),
    "proxy_get_configuration": ("ii", True),
    "proxy_continue_request": ("", True),
    "proxy_continue_response": ("", True),
    "proxy_clear_route_cache": ("", True),
}

_V010_ONLY = {"proxy_get_configuration", "proxy_continue_request", "proxy_continue_response",
              "proxy_clear_route_cache"}
_V02_ONLY = {"proxy_continue_stream", "proxy_close_stream"}

# callback -> (number of params, has_result)
CALLBACKS: dict[str, tuple[int, bool]] = {
    "proxy_on_context_create": (2, False),
    "proxy_on_vm_start": (2, True),
    "proxy_on_configure": (2, True),
    "proxy_on_tick": (1, False),
    "proxy_on_queue_ready": (2, False),
    "proxy_on_request_headers": (3, True),
    "proxy_on_request_body": (3, True),
    "proxy_on_request_trailers": (2, True),
    "proxy_on_response_headers": (3, True),
    "proxy_on_response_body": (3, True),
    "proxy_on_response_trailers": (2, True),
    "proxy_on_log": (1, False),
    "proxy_on_done": (1, True),
    "proxy_on_delete": (1, False),
    "proxy_on_http_call_response": (5, False),
    "proxy_on_grpc_receive_initial_metadata": (3, False),
    "proxy_on_grpc_receive": (3, False),
    "proxy_on_grpc_receive_trailing_metadata": (3, False),
    "proxy_on_grpc_close": (3, False),
    "proxy_on_foreign_function": (3, False),
    "proxy_on_new_connection": (1, True),
    "proxy_on_downstream_data": (3, True),
    "proxy_on_upstream_data": (3, True),
    "proxy_on_downstream_connection_close": (2, False),
    "proxy_on_upstream_connection_close": (2, False),
    "envoy_on_resolve_dns": (3, False),
}


def guest_wat(abi: AbiVersion = AbiVersion.ProxyWasm_0_2_1, *, callbacks: bool = True, malloc: str = "malloc",
              abi_marker: bool = True, extra: str = "") -> str:
    lines = ["(module"]
    lines.append('  (import "test" "event" (func $event (param i32 i32 i32 i32 i32) (result i32)))')
    names = [n for n in HOST_SIGS
             if not (abi == AbiVersion.ProxyWasm_0_1_0 and n in _V02_ONLY)
             and not (abi != AbiVersion.ProxyWasm_0_1_0 and n in _V010_ONLY)
             and not (abi != AbiVersion.ProxyWasm_0_2_1 and n == "proxy_get_log_level")]
    for name in names:
        params, _ = HOST_SIGS[name]
        ptypes = " ".join("i64" if p == "I" else "i32" for p in params)
        lines.append(f'  (import "env" "{name}" (func ${name} (param {ptypes}) (result i32)))')
    lines.append('  (memory (export "memory") 4)')
    lines.append(f"  (global $heap (mut i32) (i32.const {HEAP}))")
    if malloc:
        lines.append(f'  (func (export "{malloc}") (param $n i32) (result i32) (local $p i32)')
        lines.append("    (local.set $p (global.get $heap))")
        lines.append("    (global.set $heap (i32.add (global.get $heap) (local.get $n)))")
        lines.append("    (local.get $p))")
    if abi_marker:
        lines.append(f'  (func (export "proxy_abi_version_{abi.value.replace(".", "_")}"))')
    for name in names:
        params, _ = HOST_SIGS[name]
        ptypes = " ".join("i64" if p == "I" else "i32" for p in params)
        gets = " ".join(f"(local.get {i})" for i in range(len(params)))
        lines.append(f'  (func (export "t_{name}") (param {ptypes}) (result i32) (call ${name} {gets}))')
    if callbacks:
        for code, (name, (n, has_result)) in enumerate(CALLBACKS.items()):
            if abi == AbiVersion.ProxyWasm_0_1_0 and name in ("proxy_on_request_headers", "proxy_on_response_headers"):
                n = 2
            if abi == AbiVersion.ProxyWasm_0_1_0 and name == "proxy_on_foreign_function":
                continue
            params = " ".join(["i32"] * n)
            args = [f"(local.get {i})" if i < n else "(i32.const 0)" for i in range(4)]
            call = f"(call $event (i32.const {code}) {' '.join(args)})"
            if has_result:
                lines.append(f'  (func (export "{name}") (param {params}) (result i32) {call})')
            else:
                lines.append(f'  (func (export "{name}") (param {params}) (drop {call}))')
    lines.append(extra)
    lines.append(")")
    return "\n".join(lines)


_CALLBACK_NAMES = list(CALLBACKS)


class Guest:
    """A Wasm of the test guest, a started plugin, and a scripted event hook."""

    def __init__(self, abi: AbiVersion = AbiVersion.ProxyWasm_0_2_1, *, vm_id: str = "vm",
                 vm_configuration: bytes = b"vmcfg", plugin: Plugin | None = None, post: Any = None,
                 start: bool = True, **wasm_kwargs: Any) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.handlers: dict[str, Callable[..., int]] = {}
        self.posted: list[Callable[[], None]] = []
        wat = wasm_kwargs.pop("wat", None) or guest_wat(abi)
        module = compile_module(wasmtime.wat2wasm(wat), name=f"guest-{abi.value}")
        self.wasm = Wasm(module, post=post or self.posted.append, vm_id=vm_id,
                         vm_configuration=vm_configuration,
                         extra_host_functions={("test", "event"): self._event}, **wasm_kwargs)
        self.plugin = plugin or Plugin(name="p", root_id="root", vm_id=vm_id, plugin_configuration=b"plugincfg")
        self.root: ContextBase | None = None
        if start:
            assert self.wasm.initialize(), self.wasm.fail_message
            self.root = self.wasm.start(self.plugin)
            assert self.root is not None
            assert self.wasm.configure(self.root, self.plugin)

    @property
    def memory(self) -> Any:
        assert self.wasm.vm is not None
        return self.wasm.vm.memory

    def _event(self, code: int, a: int, b: int, c: int, d: int) -> int:
        name = _CALLBACK_NAMES[code]
        self.events.append((name, a, b, c))
        handler = self.handlers.get(name)
        if handler is None:  # default: succeed (start/configure/done say yes, filters continue)
            return 1 if name in ("proxy_on_vm_start", "proxy_on_configure", "proxy_on_done") else 0
        nargs = min(CALLBACKS[name][0], 4)
        return int(handler(*(a, b, c, d)[:max(nargs, 3)]) or 0)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    # -- host calls ------------------------------------------------------------------------

    def hostcall(self, name: str, *args: int) -> int:
        """Call a host function from inside the guest with the *current* context (in a callback)."""
        assert self.wasm.vm is not None
        fn = self.wasm.vm.get_function("t_" + name)
        assert fn is not None, name
        return int(fn(*args))

    def call(self, ctx: ContextBase | None, name: str, *args: int) -> int:
        """Call a host function as the plugin would while `ctx` is current (default: the root)."""
        assert self.wasm.vm is not None
        fn = self.wasm.vm.get_function("t_" + name)
        assert fn is not None, name
        return int(self.wasm.call(ctx or self.root, "t_" + name, fn, *args))

    # -- memory helpers --------------------------------------------------------------------

    def put(self, data: bytes, at: int = SCRATCH) -> tuple[int, int]:
        self.memory.write(at, data)
        return at, len(data)

    def u32(self, ptr: int) -> int:
        return int(self.memory.read_u32(ptr))

    def u64(self, ptr: int) -> int:
        return int(self.memory.read_u64(ptr))

    def out_bytes(self, ptr_ptr: int, size_ptr: int) -> bytes:
        ptr, size = self.u32(ptr_ptr), self.u32(size_ptr)
        return bytes(self.memory.read(ptr, size)) if size else b""


def pack_u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)
