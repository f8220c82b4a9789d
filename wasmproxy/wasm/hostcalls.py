"""The Proxy-Wasm host-function table: marshalling and status codes only (cpp-host src/exports.cc).

Every host call: find the effective context, read guest memory (a bad pointer is
``InvalidMemoryAccess``), call one typed `ContextBase` method, write the results back (memory
for returned data comes from the plugin's ``malloc`` / ``proxy_on_memory_allocate``), and
return a `WasmResult`. Nothing raises into the guest: the only exception that leaves a host
call is a trap of a nested guest call (the plugin's allocator), which is the guest's own.

Values arrive as the runtime passes them: i32 as unsigned ints, i64 as signed ints.

Wire format of a header map ("pairs"): u32 count, then count x (u32 key length, u32 value
length), then each key and each value followed by a NUL. Property paths are NUL-separated.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .abi import (
    BUFFER_TYPE_MAX,
    HEADER_MAP_TYPE_MAX,
    LOG_LEVEL_MAX,
    PAIRS_MAX_BYTES,
    PAIRS_MAX_COUNT,
    STREAM_TYPE_MAX,
    AbiVersion,
    WasmResult,
)
from ..log import get_logger
from .context import _PY_LEVELS  # spdlog level -> Python level, as ContextBase.log_message maps it
from .context import copy_into
from .runtime import InvalidMemoryAccess, WasmMemory, with_error_result

if TYPE_CHECKING:
    from .wasm import Wasm

__all__ = ["host_functions", "marshal_pairs", "unmarshal_pairs"]

_OK = int(WasmResult.Ok)
_NOT_FOUND = int(WasmResult.NotFound)
_BAD_ARGUMENT = int(WasmResult.BadArgument)
_INVALID_MEMORY = int(WasmResult.InvalidMemoryAccess)
_INTERNAL_FAILURE = int(WasmResult.InternalFailure)

_log = get_logger("wasm")
# logging.Logger.isEnabledFor's level -> bool cache (cleared in place, never replaced).
_log_enabled_cache: dict[int, bool] = _log._cache  # type: ignore[attr-defined]

_U32 = struct.Struct("<I")


# -- pairs (cpp-host PairsUtil) ----------------------------------------------------------------


def marshal_pairs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Serialize (key, value) pairs in the header-map wire format."""
    parts = [_U32.pack(len(pairs))]
    for k, v in pairs:
        parts.append(struct.pack("<II", len(k), len(v)))
    for k, v in pairs:
        parts += (k, b"\0", v, b"\0")
    return b"".join(parts)


def unmarshal_pairs(buffer: bytes) -> list[tuple[bytes, bytes]]:
    """Parse the header-map wire format; anything malformed or over the limits gives []."""
    if len(buffer) > PAIRS_MAX_BYTES or len(buffer) < 4:
        return []
    (count,) = _U32.unpack_from(buffer, 0)
    if count > PAIRS_MAX_COUNT or 4 + count * 8 > len(buffer):
        return []
    sizes = struct.unpack_from(f"<{2 * count}I", buffer, 4)
    pos = 4 + count * 8
    end = len(buffer)
    # Fast path: split at NULs. When every piece has its declared size (and the data ends with
    # the last value's NUL), this is exactly the size-driven parse below; a key or value with a
    # NUL inside falls back to it.
    parts = buffer[pos:].split(b"\0")
    last = parts.pop()
    if not last and tuple(map(len, parts)) == sizes:
        return list(zip(parts[0::2], parts[1::2]))
    result = []
    for i in range(count):
        klen, vlen = sizes[2 * i], sizes[2 * i + 1]
        if pos + klen + 1 > end or buffer[pos + klen] != 0:
            return []
        key = buffer[pos:pos + klen]
        pos += klen + 1
        if pos + vlen + 1 > end or buffer[pos + vlen] != 0:
            return []
        result.append((key, buffer[pos:pos + vlen]))
        pos += vlen + 1
    if pos != end:
        return []
    return result


# -- the table ---------------------------------------------------------------------------------


def host_functions(wasm: "Wasm") -> dict[tuple[str, str], Callable[..., Any]]:
    """The ("env", name) -> callable table for `wasm`'s ABI version, bound to `wasm`.

    WASI and the Emscripten helpers (pthread_equal, emscripten_notify_memory_growth) come
    from wasi.py; the Wasm merges the tables.
    """
    x = _Exports(wasm)
    names = [
        "proxy_log", "proxy_get_status", "proxy_set_property", "proxy_get_property",
        "proxy_send_local_response", "proxy_get_shared_data", "proxy_set_shared_data",
        "proxy_register_shared_queue", "proxy_resolve_shared_queue", "proxy_dequeue_shared_queue",
        "proxy_enqueue_shared_queue", "proxy_get_header_map_value", "proxy_add_header_map_value",
        "proxy_replace_header_map_value", "proxy_remove_header_map_value", "proxy_get_header_map_pairs",
        "proxy_set_header_map_pairs", "proxy_get_header_map_size", "proxy_get_buffer_status",
        "proxy_get_buffer_bytes", "proxy_set_buffer_bytes", "proxy_http_call", "proxy_grpc_call",
        "proxy_grpc_stream", "proxy_grpc_close", "proxy_grpc_cancel", "proxy_grpc_send",
        "proxy_set_tick_period_milliseconds", "proxy_get_current_time_nanoseconds",
        "proxy_define_metric", "proxy_increment_metric", "proxy_record_metric", "proxy_get_metric",
        "proxy_set_effective_context", "proxy_done", "proxy_call_foreign_function",
        "envoy_resolve_dns",
    ]
    if wasm.abi_version == AbiVersion.ProxyWasm_0_1_0:
        names += ["proxy_get_configuration", "proxy_continue_request", "proxy_continue_response",
                  "proxy_clear_route_cache"]
    else:
        names += ["proxy_continue_stream", "proxy_close_stream"]
        if wasm.abi_version == AbiVersion.ProxyWasm_0_2_1:
            names.append("proxy_get_log_level")
    return {("env", name): _guard(name, getattr(x, name)) for name in names}


def _guard(name: str, fn: Callable[..., int]) -> Callable[..., int]:
    """A bug in a host call must not kill the VM: log it and answer InternalFailure.

    A trap of a nested guest call (the plugin's allocator) is the guest's and propagates.
    The runtime's trampoline applies this (with_error_result), so a host call that does not
    raise costs no wrapper frame.
    """

    def internal_failure(e: Exception) -> int:
        _log.exception("wasm host call %s failed", name)
        return _INTERNAL_FAILURE

    host_call = functools.partial(fn)
    host_call.__name__ = name  # type: ignore[attr-defined]
    return with_error_result(host_call, internal_failure)


class _Exports:
    """One bound method per host function; each returns an int status and never raises."""

    def __init__(self, wasm: "Wasm") -> None:
        self.wasm = wasm

    # helpers

    def _read(self, ptr: int, size: int) -> bytes:
        vm = self.wasm.vm
        assert vm is not None
        return vm.memory.read(ptr, size)

    def _memory(self) -> WasmMemory:
        """The VM's memory (calls that read twice take it once)."""
        vm = self.wasm.vm
        assert vm is not None
        return vm.memory

    def _write_u32(self, ptr: int, value: int) -> None:
        vm = self.wasm.vm
        assert vm is not None
        vm.memory.write_u32(ptr, value)

    def _write_u32s(self, *pointer_values: tuple[int, int]) -> int:
        """Write each (pointer, value) result; a bad pointer is InvalidMemoryAccess, as cpp-host's setDatatype."""
        write_u32 = self._memory().write_u32  # every caller writes at least one
        try:
            for ptr, value in pointer_values:
                write_u32(ptr, value)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return _OK

    def _copy_out(self, data: bytes, ptr_ptr: int, size_ptr: int) -> int:
        try:
            ok = self.wasm.copy_to_pointer_size(data, ptr_ptr, size_ptr)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return _OK if ok else _INVALID_MEMORY

    # general

    def proxy_log(self, level: int, ptr: int, size: int) -> int:
        if level > LOG_LEVEL_MAX:
            return _BAD_ARGUMENT
        py_level = _PY_LEVELS[level]
        # isEnabledFor's own per-level cache first (log.py clears it on every level change);
        # a miss asks isEnabledFor, which fills it. Plugins (the AssemblyScript SDK) log on
        # every callback, mostly below the configured level.
        enabled = _log_enabled_cache.get(py_level)
        if enabled is None:
            enabled = _log.isEnabledFor(py_level)
        if not enabled:
            # Below the configured level: Envoy checks the message's range (getMemory) and its
            # ENVOY_LOG drops the line. The same here, without reading (or copying) the message.
            vm = self.wasm.vm
            assert vm is not None
            memory = vm.memory
            if 0 <= ptr and 0 <= size and ptr + size <= memory._size:
                return _OK  # in_bounds' first test, inline; it refreshes the size otherwise
            return _OK if memory.in_bounds(ptr, size) else _INVALID_MEMORY
        ctx = self.wasm.context_or_effective_context()
        try:
            message = self._read(ptr, size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.log_message(level, message))

    def proxy_get_log_level(self, level_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        return self._write_u32s((level_ptr, ctx.get_log_level()))

    def proxy_get_current_time_nanoseconds(self, result_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        vm = self.wasm.vm
        assert vm is not None
        try:
            vm.memory.write_u64(result_ptr, ctx.get_current_time_nanoseconds())
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return _OK

    def proxy_set_tick_period_milliseconds(self, period_ms: int) -> int:
        return int(self.wasm.context_or_effective_context().set_timer_period(period_ms))

    def proxy_get_configuration(self, ptr_ptr: int, size_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        return self._copy_out(ctx.get_configuration(), ptr_ptr, size_ptr)

    def proxy_get_status(self, code_ptr: int, ptr_ptr: int, size_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context().root_context()
        code, message = ctx.get_status()
        try:
            self._write_u32(code_ptr, code)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return self._copy_out(message, ptr_ptr, size_ptr)

    def proxy_set_effective_context(self, context_id: int) -> int:
        if self.wasm.get_context(context_id) is None:
            return _BAD_ARGUMENT
        self.wasm.effective_context_id = context_id
        return _OK

    def proxy_done(self) -> int:
        ctx = self.wasm.context_or_effective_context()
        return int(self.wasm.done(ctx))

    def proxy_call_foreign_function(self, name_ptr: int, name_size: int, args_ptr: int, args_size: int,
                                    results_ptr: int, results_size_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        memory = self._memory()
        try:
            name, args = memory.read_two(name_ptr, name_size, args_ptr, args_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        fn = self.wasm.get_foreign_function(name.decode("utf-8", "replace"))
        if fn is None:
            return _NOT_FOUND
        result, data = fn(self.wasm, ctx, args)
        address = 0
        vm = self.wasm.vm
        assert vm is not None
        try:
            if results_ptr:
                if data:
                    allocated = self.wasm.alloc_memory(len(data))
                    if allocated is None:
                        return _INVALID_MEMORY
                    address = allocated
                    vm.memory.write(address, data)
                vm.memory.write_u32(results_ptr, address)
            if results_size_ptr:
                vm.memory.write_u32(results_size_ptr, len(data))
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(result)

    # properties

    def proxy_get_property(self, path_ptr: int, path_size: int, ptr_ptr: int, size_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            path = self._read(path_ptr, path_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, value = ctx.get_property(path)
        if result != WasmResult.Ok:
            return int(result)
        return self._copy_out(value, ptr_ptr, size_ptr)

    def proxy_set_property(self, key_ptr: int, key_size: int, value_ptr: int, value_size: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        memory = self._memory()
        try:
            key, value = memory.read_two(key_ptr, key_size, value_ptr, value_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.set_property(key, value))

    # streams

    def proxy_continue_request(self) -> int:
        return int(self.wasm.context_or_effective_context().continue_stream(0))

    def proxy_continue_response(self) -> int:
        return int(self.wasm.context_or_effective_context().continue_stream(1))

    def proxy_continue_stream(self, stream_type: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        if stream_type > STREAM_TYPE_MAX:
            return _BAD_ARGUMENT
        return int(ctx.continue_stream(stream_type))

    def proxy_close_stream(self, stream_type: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        if stream_type > STREAM_TYPE_MAX:
            return _BAD_ARGUMENT
        return int(ctx.close_stream(stream_type))

    def proxy_send_local_response(self, code: int, details_ptr: int, details_size: int, body_ptr: int,
                                  body_size: int, headers_ptr: int, headers_size: int, grpc_status: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            details = self._read(details_ptr, details_size)
            body = self._read(body_ptr, body_size)
            headers = self._read(headers_ptr, headers_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        # grpc_status is an i32 on the wire: -1 (no status) arrives as 0xFFFFFFFF.
        grpc = grpc_status - (1 << 32) if grpc_status >= 1 << 31 else grpc_status
        ctx.send_local_response(code, body, unmarshal_pairs(headers), grpc, details)
        self.wasm.stop_next_iteration(True)
        return _OK

    def proxy_clear_route_cache(self) -> int:
        self.wasm.context_or_effective_context().clear_route_cache()
        return _OK

    # shared data and queues

    def proxy_get_shared_data(self, key_ptr: int, key_size: int, ptr_ptr: int, size_ptr: int, cas_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            key = self._read(key_ptr, key_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, value, cas = ctx.get_shared_data(key)
        if result != WasmResult.Ok:
            return int(result)
        status = self._copy_out(value, ptr_ptr, size_ptr)
        if status != _OK:
            return status
        return self._write_u32s((cas_ptr, cas))

    def proxy_set_shared_data(self, key_ptr: int, key_size: int, value_ptr: int, value_size: int, cas: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        memory = self._memory()
        try:
            key, value = memory.read_two(key_ptr, key_size, value_ptr, value_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.set_shared_data(key, value, cas))

    def proxy_register_shared_queue(self, name_ptr: int, name_size: int, token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            name = self._read(name_ptr, name_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, token = ctx.register_shared_queue(name)
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((token_ptr, token))

    def proxy_resolve_shared_queue(self, vm_id_ptr: int, vm_id_size: int, name_ptr: int, name_size: int,
                                   token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        memory = self._memory()
        try:
            vm_id, name = memory.read_two(vm_id_ptr, vm_id_size, name_ptr, name_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, token = ctx.resolve_shared_queue(vm_id, name)
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((token_ptr, token))

    def proxy_dequeue_shared_queue(self, token: int, ptr_ptr: int, size_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        result, data = ctx.dequeue_shared_queue(token)
        if result != WasmResult.Ok:
            return int(result)
        return self._copy_out(data, ptr_ptr, size_ptr)

    def proxy_enqueue_shared_queue(self, token: int, data_ptr: int, data_size: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            data = self._read(data_ptr, data_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.enqueue_shared_queue(token, data))

    # header maps

    def proxy_add_header_map_value(self, map_type: int, key_ptr: int, key_size: int, value_ptr: int,
                                   value_size: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        vm = wasm.vm
        assert vm is not None
        memory = vm.memory
        try:
            key, value = memory.read_two(key_ptr, key_size, value_ptr, value_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.add_header_map_value(map_type, key, value))

    def proxy_get_header_map_value(self, map_type: int, key_ptr: int, key_size: int, ptr_ptr: int,
                                   size_ptr: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        vm = wasm.vm
        assert vm is not None
        try:
            key = vm.memory.read(key_ptr, key_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, value = ctx.get_header_map_value(map_type, key)
        if result != WasmResult.Ok:
            return int(result)
        return self._copy_out(value, ptr_ptr, size_ptr)

    def proxy_replace_header_map_value(self, map_type: int, key_ptr: int, key_size: int, value_ptr: int,
                                       value_size: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        vm = wasm.vm
        assert vm is not None
        memory = vm.memory
        try:
            key, value = memory.read_two(key_ptr, key_size, value_ptr, value_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.replace_header_map_value(map_type, key, value))

    def proxy_remove_header_map_value(self, map_type: int, key_ptr: int, key_size: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        ctx = self.wasm.context_or_effective_context()
        try:
            key = self._read(key_ptr, key_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.remove_header_map_value(map_type, key))

    def proxy_get_header_map_pairs(self, map_type: int, ptr_ptr: int, size_ptr: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        ctx = self.wasm.context_or_effective_context()
        result, pairs = ctx.get_header_map_pairs(map_type)
        if result != WasmResult.Ok:
            return int(result)
        return self._copy_out(marshal_pairs(pairs) if pairs else b"", ptr_ptr, size_ptr)

    def proxy_set_header_map_pairs(self, map_type: int, ptr: int, size: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        ctx = self.wasm.context_or_effective_context()
        try:
            data = self._read(ptr, size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.set_header_map_pairs(map_type, unmarshal_pairs(data)))

    def proxy_get_header_map_size(self, map_type: int, size_ptr: int) -> int:
        if map_type > HEADER_MAP_TYPE_MAX:
            return _BAD_ARGUMENT
        ctx = self.wasm.context_or_effective_context()
        result, size = ctx.get_header_map_size(map_type)
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((size_ptr, size))

    # buffers

    def proxy_get_buffer_bytes(self, buffer_type: int, start: int, length: int, ptr_ptr: int,
                               size_ptr: int) -> int:
        if buffer_type > BUFFER_TYPE_MAX:
            return _BAD_ARGUMENT
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        data = ctx.get_buffer_data(buffer_type)
        if data is None:
            return _NOT_FOUND
        size = len(data)
        if start > size:
            length = 0
        elif start + length > size:
            length = size - start
        if length == 0:
            return self._write_u32s((ptr_ptr, 0), (size_ptr, 0))
        # One copy to bytes (bytes(bytes) is the object itself): the plugin's malloc runs
        # before it is written into guest memory and must not see a buffer that changes.
        chunk = bytes(data) if length == size else bytes(data[start:start + length])
        return self._copy_out(chunk, ptr_ptr, size_ptr)

    def proxy_get_buffer_status(self, buffer_type: int, length_ptr: int, flags_ptr: int) -> int:
        if buffer_type > BUFFER_TYPE_MAX:
            return _BAD_ARGUMENT
        ctx = self.wasm.context_or_effective_context()
        data = ctx.get_buffer_data(buffer_type)
        if data is None:
            return _NOT_FOUND
        return self._write_u32s((length_ptr, len(data)), (flags_ptr, 0))

    def proxy_set_buffer_bytes(self, buffer_type: int, start: int, length: int, data_ptr: int,
                               data_size: int) -> int:
        if buffer_type > BUFFER_TYPE_MAX:
            return _BAD_ARGUMENT
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        data = ctx.get_buffer_data(buffer_type)
        if data is None:
            return _NOT_FOUND
        vm = wasm.vm
        assert vm is not None
        try:
            value = vm.memory.view(data_ptr, data_size)  # copied once, by copy_into
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(copy_into(data, start, length, value))

    # callouts (always on the root context)

    def proxy_http_call(self, uri_ptr: int, uri_size: int, headers_ptr: int, headers_size: int, body_ptr: int,
                        body_size: int, trailers_ptr: int, trailers_size: int, timeout_ms: int,
                        token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context().root_context()
        memory = self._memory()
        try:
            uri, body = memory.read_two(uri_ptr, uri_size, body_ptr, body_size)
            headers, trailers = memory.read_two(headers_ptr, headers_size, trailers_ptr, trailers_size)
            # Verify the token pointer before starting anything asynchronous (cpp-host).
            memory.write_u32(token_ptr, 0)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, token = ctx.http_call(uri, unmarshal_pairs(headers), body, unmarshal_pairs(trailers), timeout_ms)
        memory.write_u32(token_ptr, token)
        return int(result)

    def proxy_grpc_call(self, service_ptr: int, service_size: int, service_name_ptr: int, service_name_size: int,
                        method_ptr: int, method_size: int, metadata_ptr: int, metadata_size: int,
                        request_ptr: int, request_size: int, timeout_ms: int, token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context().root_context()
        try:
            service = self._read(service_ptr, service_size)
            service_name = self._read(service_name_ptr, service_name_size)
            method = self._read(method_ptr, method_size)
            metadata = self._read(metadata_ptr, metadata_size)
            request = self._read(request_ptr, request_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, token = ctx.grpc_call(service, service_name, method, unmarshal_pairs(metadata), request, timeout_ms)
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((token_ptr, token))

    def proxy_grpc_stream(self, service_ptr: int, service_size: int, service_name_ptr: int,
                          service_name_size: int, method_ptr: int, method_size: int, metadata_ptr: int,
                          metadata_size: int, token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context().root_context()
        try:
            service = self._read(service_ptr, service_size)
            service_name = self._read(service_name_ptr, service_name_size)
            method = self._read(method_ptr, method_size)
            metadata = self._read(metadata_ptr, metadata_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, token = ctx.grpc_stream(service, service_name, method, unmarshal_pairs(metadata))
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((token_ptr, token))

    def proxy_grpc_send(self, token: int, message_ptr: int, message_size: int, end_stream: int) -> int:
        ctx = self.wasm.context_or_effective_context().root_context()
        try:
            message = self._read(message_ptr, message_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return int(ctx.grpc_send(token, message, end_stream != 0))

    def proxy_grpc_close(self, token: int) -> int:
        return int(self.wasm.context_or_effective_context().root_context().grpc_close(token))

    def proxy_grpc_cancel(self, token: int) -> int:
        return int(self.wasm.context_or_effective_context().root_context().grpc_cancel(token))

    def envoy_resolve_dns(self, address_ptr: int, address_size: int, token_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            address = self._read(address_ptr, address_size)
            # Envoy stores the token before resolving: an answer may arrive inside this call.
            token = self.wasm.next_dns_token()
            self._write_u32(token_ptr, token)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result = ctx.resolve_dns(address, token)
        if result != WasmResult.Ok:
            self._write_u32(token_ptr, 0)
        return int(result)

    # metrics

    def proxy_define_metric(self, metric_type: int, name_ptr: int, name_size: int, id_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        try:
            name = self._read(name_ptr, name_size)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        result, metric_id = ctx.define_metric(metric_type, name)
        if result != WasmResult.Ok:
            return int(result)
        return self._write_u32s((id_ptr, metric_id))

    def proxy_increment_metric(self, metric_id: int, offset: int) -> int:
        wasm = self.wasm
        ctx = wasm.current_context  # context_or_effective_context(), inlined for the plain case
        if ctx is None or wasm.effective_context_id:
            ctx = wasm.context_or_effective_context()
        return int(ctx.increment_metric(metric_id, offset))

    def proxy_record_metric(self, metric_id: int, value: int) -> int:
        # The value is a u64 on the wire; the runtime hands i64 over signed.
        return int(self.wasm.context_or_effective_context().record_metric(metric_id, value & 0xFFFFFFFFFFFFFFFF))

    def proxy_get_metric(self, metric_id: int, result_ptr: int) -> int:
        ctx = self.wasm.context_or_effective_context()
        result, value = ctx.get_metric(metric_id)
        if result != WasmResult.Ok:
            return int(result)
        vm = self.wasm.vm
        assert vm is not None
        try:
            vm.memory.write_u64(result_ptr, value)
        except InvalidMemoryAccess:
            return _INVALID_MEMORY
        return _OK
