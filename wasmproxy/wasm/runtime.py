"""The one module that talks to wasmtime: engine, compiled modules, VMs and their fast paths.

Everything else in wasmproxy sees plain Python: ints in, ints out, bytes for memory. This mirrors
proxy-wasm-cpp-host's ``WasmVm`` (``include/proxy-wasm/wasm_vm.h``), which alone faces the engine.

Public API (thread rules in each docstring's first line)::

    engine() -> wasmtime.Engine             # one per process: cranelift, epoch interruption on
    engine_tick() -> None                   # any thread: advance the epoch by one tick
    EpochTicker(interval_s=0.01).start() / .stop()   # a native timer thread advancing the epoch
    compile_module(code, *, cache_dir=None, name="") -> WasmModule   # any thread, cached
    WasmModule: .sha256 .name .abi_version ("0.1.0" | "0.2.0" | "0.2.1" | None)
                .exports {name: FuncSig}  .imports [(module, name, FuncSig)]  .from_disk_cache
    WasmVm(module, host_functions: Mapping[(module, name), Callable], *, name="",
           memory_limit_bytes=MAX_WASM_MEMORY_SIZE_BYTES, epoch_deadline_ticks=None)
      .get_function(name) -> Callable[..., int | float | tuple | None] | None   # owner thread
      .memory: WasmMemory   .read(ptr, n) -> bytes  .write(ptr, data)  .read_u32/.write_u32
                            .read_u64/.write_u64  .read_cstr(ptr)  .size()  .in_bounds(ptr, n)
      .clone(host_functions=None, *, name=None) -> WasmVm   # any thread; owned by the caller
      .set_epoch_deadline_ticks(ticks | None)               # owner thread
    FuncSig(params, results)  # tuples of 'i32' 'i64' 'f32' 'f64'
    with_signature(fn, params, results=("i32",)) -> fn  # declare a host function's wasm type
    with_error_result(fn, on_error) -> fn  # fn's Exception gives the result on_error(e), no trap
    WasmTrap   .message (V8's words, as Envoy logs them)  .trap_code  .frames  .detail
               str() adds Envoy's "Proxy-Wasm plugin in-VM backtrace" when names exist
    WasmLoadError   # compile/link/instantiate failures, Envoy's wording for missing imports
    InvalidMemoryAccess   # a guest pointer outside linear memory (host calls return
                          # WasmResult.InvalidMemoryAccess for it)

Value conventions (the same both ways across the boundary, as cpp-host's ``Word``):
``i32`` values are unsigned Python ints ``0 .. 2**32-1`` (pointers and sizes are u32), ``i64``
values are signed, ``f32``/``f64`` are floats. A host callable returns an int for a single
result, ``None`` when the import has no result; a function with several results takes/returns
a tuple.

Why the raw C API: wasmtime-py's ``Func.__call__`` costs ~24 us and its Python host callbacks
~10 us on this machine; ``wasmtime_func_call_unchecked`` with a preallocated
``wasmtime_val_raw_t`` array, host functions made by ``wasmtime_func_new_unchecked`` that read
their raw argument array, and linear memory accessed through ``memoryview`` over
``wasmtime_memory_data`` cost a small fraction of that (see ``bench/micro/bench_runtime.py``).

Safety invariants this module relies on:
* ``memory_may_move`` is off, so a linear memory's base address is fixed for its lifetime and a
  cached view only needs to be re-read when an access goes past its cached size (memory only
  grows). Every access is bounds-checked against the current size.
* Every ctypes callback and buffer is owned by the ``WasmVm`` (and the memory view keeps the
  Store alive), so nothing is freed while wasmtime may still use it.
* A host callable's exception never unwinds through wasm: it is logged and becomes a trap of
  the current call; the caller sees ``WasmTrap`` (whose ``__cause__`` is the Python exception;
  KeyboardInterrupt and SystemExit are re-raised as themselves once the guest has unwound).
  A host callable declared ``with_error_result`` turns its own Exceptions into a result instead.
* Re-entrancy: a host function may call back into the same VM (e.g. the plugin's ``malloc``).
  The context a host function receives (``wasmtime_caller_context``) is the same
  ``wasmtime_context_t`` as the Store's, so nested calls use it directly; a test pins this.
* Epoch interruption is always compiled in. A VM without a CPU deadline gets a deadline so far
  away that it never fires; with ``epoch_deadline_ticks`` the deadline is re-armed before every
  outermost entry into the guest (without re-arming, the next call would trap at once).
* The GIL: a VM with a CPU deadline keeps the GIL while the guest runs (host callbacks then take
  it without a switch). Releasing it around every entry let another worker thread take it each
  time: at --concurrency 2 that was ~3 thread switches per request and ~60% more CPU. The epoch
  still advances while a guest holds the GIL, because ``EpochTicker`` is a POSIX timer whose
  SIGEV_THREAD notification calls ``wasmtime_engine_increment_epoch`` from a native thread that
  never runs Python. A VM without a deadline releases the GIL around guest code, so a plugin that
  never returns blocks only its own thread (as in Envoy).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import struct
import tempfile
import threading
import weakref
from ctypes import CFUNCTYPE, POINTER, PYFUNCTYPE, addressof, c_double, c_float, c_int64, c_size_t, c_uint32
from ctypes import c_int, c_long, c_uint64, c_void_p
from operator import itemgetter
from typing import Any, Callable, Mapping, NamedTuple

import wasmtime
from wasmtime import _ffi as _wffi
from wasmtime._trap import Frame as _Frame
from wasmtime._trap import FrameList as _FrameList

from wasmproxy.log import get_logger

__all__ = [
    "MAX_WASM_MEMORY_SIZE_BYTES",
    "EpochTicker",
    "FuncSig",
    "HostFunction",
    "InvalidMemoryAccess",
    "WasmFrame",
    "WasmLoadError",
    "WasmMemory",
    "WasmModule",
    "WasmTrap",
    "WasmVm",
    "compile_module",
    "engine",
    "engine_tick",
    "with_error_result",
    "with_signature",
]

log = get_logger("wasm")

# cpp-host limits.h: PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES.
MAX_WASM_MEMORY_SIZE_BYTES = 1024 * 1024 * 1024

# ABI versions a module declares by exporting an empty function of this name.
_ABI_VERSION_EXPORTS = {
    "proxy_abi_version_0_1_0": "0.1.0",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_2_1": "0.2.1",
}

# A deadline this many ticks away never fires (a 10 ms ticker would need ~10^9 years).
_NO_DEADLINE_TICKS = 1 << 62

HostFunction = Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class WasmLoadError(Exception):
    """The code could not be compiled, or the module could not be linked or instantiated."""


class InvalidMemoryAccess(Exception):
    """A guest pointer/length pair lies outside the current linear memory."""


class WasmFrame(NamedTuple):
    func_index: int
    func_name: str | None  # from the name section, when the module has one
    module_offset: int


class WasmTrap(Exception):
    """The guest trapped (unreachable, out-of-bounds, interrupt, a host callable raising...).

    ``message`` uses V8's wording as Envoy logs it ("Uncaught RuntimeError: unreachable"), so
    "Function: <name> failed: <str(trap)>" reads as in Envoy; ``detail`` is wasmtime's own text.
    ``trap_code`` is wasmtime's code in lower case (``"unreachable"``, ``"interrupt"``,
    ``"stack_overflow"``, ...) or None for a trap raised by a host callable; ``frames`` is the
    wasm backtrace, innermost first. ``str()`` adds Envoy's "Proxy-Wasm plugin in-VM backtrace"
    when the module has a name section (as cpp-host does; without names it prints none).
    """

    def __init__(self, message: str, trap_code: str | None = None,
                 frames: list[WasmFrame] | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.trap_code = trap_code
        self.frames = frames or []
        self.detail = detail or message

    @property
    def backtrace(self) -> str:
        """cpp-host's format: index right-aligned in 3 columns, module offset, function name."""
        return "\n".join(f"{i:>3}:  {f.module_offset:#x} - {f.func_name or ''}"
                         for i, f in enumerate(self.frames))

    def __str__(self) -> str:
        if not any(f.func_name for f in self.frames):
            return self.message
        return f"{self.message}\nProxy-Wasm plugin in-VM backtrace:\n{self.backtrace}"


# ---------------------------------------------------------------------------------------------
# Engine and epoch
# ---------------------------------------------------------------------------------------------

# The settings below are part of the precompiled-cache key: change one, change the key.
_ENGINE_SETTINGS = "cranelift;opt=speed;epoch_interruption;memory_may_move=0"
_engine: wasmtime.Engine | None = None
_engine_lock = threading.Lock()


def engine() -> wasmtime.Engine:
    """Any thread: the process-wide Engine (created on first use)."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                cfg = wasmtime.Config()
                cfg.strategy = "cranelift"
                cfg.cranelift_opt_level = "speed"
                cfg.epoch_interruption = True
                # WasmMemory caches the base address: memories must never move.
                cfg.memory_may_move = False
                _engine = wasmtime.Engine(cfg)
    return _engine


def engine_tick() -> None:
    """Any thread: advance the engine's epoch; guests past their deadline trap "interrupt"."""
    _engine_increment_epoch(_engine_address())


_engine_addr = 0


def _engine_address() -> int:
    global _engine_addr
    if not _engine_addr:
        _engine_addr = _context_address(engine().ptr())
    return _engine_addr


class _SigEvent(ctypes.Structure):
    """glibc's ``struct sigevent`` (64 bytes on LP64) for SIGEV_THREAD."""

    _fields_ = [("sigev_value", c_void_p), ("sigev_signo", c_int), ("sigev_notify", c_int),
                ("sigev_notify_function", c_void_p), ("sigev_notify_attributes", c_void_p),
                ("_pad", c_int * 8)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", c_long), ("tv_nsec", c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_SIGEV_THREAD = 2
_CLOCK_MONOTONIC = 1


class EpochTicker:
    """Owner thread: advances the engine's epoch every ``interval_s`` until stopped, without the
    GIL: a POSIX timer (timer_create, SIGEV_THREAD) whose notification is
    ``wasmtime_engine_increment_epoch(engine)`` itself, run by a glibc helper thread (a guest
    holding the GIL is still interrupted; see the module docstring).

    With ``epoch_deadline_ticks=N`` a guest entry may run between (N-1) and N intervals.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._timer = c_void_p()
        self._started = False

    def start(self) -> "EpochTicker":
        event = _SigEvent(sigev_value=_engine_address(), sigev_notify=_SIGEV_THREAD,
                          sigev_notify_function=ctypes.cast(_dll.wasmtime_engine_increment_epoch, c_void_p).value)
        if _libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)):
            raise OSError(ctypes.get_errno(), f"timer_create: {os.strerror(ctypes.get_errno())}")
        sec, nsec = divmod(max(1, round(self.interval_s * 1e9)), 1_000_000_000)
        period = _TimeSpec(sec, nsec)
        if _libc.timer_settime(self._timer, 0, ctypes.byref(_ITimerSpec(period, period)), None):
            err = ctypes.get_errno()
            _libc.timer_delete(self._timer)
            raise OSError(err, f"timer_settime: {os.strerror(err)}")
        self._started = True
        # Stopped before interpreter teardown frees the engine, which a tick would then touch.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            _libc.timer_delete(self._timer)
            atexit.unregister(self.stop)


# ---------------------------------------------------------------------------------------------
# Raw C entry points (own prototypes taking plain ints, so ctypes converts nothing)
# ---------------------------------------------------------------------------------------------

_dll = _wffi.dll
_libc = ctypes.CDLL(None, use_errno=True)  # timer_create & co. (glibc >= 2.34 has them in libc)
_libc.timer_create.argtypes = [c_int, c_void_p, c_void_p]
_libc.timer_settime.argtypes = [c_void_p, c_int, c_void_p, c_void_p]
_libc.timer_delete.argtypes = [c_void_p]


def _c(name: str, restype: Any, *argtypes: Any) -> Any:
    # A fresh function object: never mutate the argtypes of wasmtime-py's shared ones.
    return CFUNCTYPE(restype, *argtypes)((name, _dll))


# Pointers travel as c_void_p: ctypes converts ints to it faster than to c_size_t (~0.2 us/call).
# On 64-bit targets a size_t or u64 argument travels as c_void_p too (the same register), which
# saves ~0.1 us per call in the two calls made per guest entry.
_WORD64 = c_void_p if ctypes.sizeof(c_void_p) == 8 else None
# A guest entry for VMs with a CPU deadline: it keeps the GIL (see the module docstring).
_func_call_unchecked_gil = PYFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, _WORD64 or c_size_t, c_void_p)(
    ("wasmtime_func_call_unchecked", _dll))
# WasmVm's per-export callables enter through these two (releasing / keeping the GIL): their
# five arguments never change, so they pass prebuilt c_void_p/c_size_t objects, which ctypes
# hands over as they are when the function has no argtypes (~40 ns less than converting ints).
_func_call_prebuilt = CFUNCTYPE(c_void_p)(("wasmtime_func_call_unchecked", _dll))
_func_call_prebuilt.argtypes = None
_func_call_prebuilt_gil = PYFUNCTYPE(c_void_p)(("wasmtime_func_call_unchecked", _dll))
_func_call_prebuilt_gil.argtypes = None
# Re-armed before every outermost guest entry: a PYFUNCTYPE keeps the GIL (the call only stores
# a number, it never blocks or calls back): ~0.17 us instead of ~0.30 us per call.
_context_set_epoch_deadline = PYFUNCTYPE(None, c_void_p, _WORD64 or c_uint64)(
    ("wasmtime_context_set_epoch_deadline", _dll))
# An atomic add: engine_tick (tests) keeps the GIL for it.
_engine_increment_epoch = PYFUNCTYPE(None, c_void_p)(("wasmtime_engine_increment_epoch", _dll))
_memory_data = _c("wasmtime_memory_data", c_size_t, c_void_p, c_void_p)
_memory_data_size = _c("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)
_trap_new = _c("wasmtime_trap_new", c_size_t, ctypes.c_char_p, c_size_t)
_EXTERN_FUNC = _wffi.WASMTIME_EXTERN_FUNC.value  # wasmtime_extern_kind_t
_EXTERN_MEMORY = _wffi.WASMTIME_EXTERN_MEMORY.value
_instance_export_get = _c("wasmtime_instance_export_get", ctypes.c_bool,
                          c_void_p, c_void_p, ctypes.c_char_p, c_size_t, c_void_p)

# wasmtime_func_unchecked_callback_t(env, caller, args_and_results, num) -> wasm_trap_t*,
# every pointer as a plain int.
_HOST_CALLBACK = CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_func_new_unchecked = _c("wasmtime_func_new_unchecked", None,
                         c_void_p, c_void_p, _HOST_CALLBACK, c_void_p, c_void_p, c_void_p)

# One wasmtime_val_raw_t is 16 bytes (a union up to v128), little-endian.
_RAW_VIEW = {  # wasm type -> (ctypes element, elements per val_raw slot)
    "i32": (c_uint32, 4),
    "i64": (c_int64, 2),
    "f32": (c_float, 4),
    "f64": (c_double, 2),
}


def _trap_reason(message: str) -> str:
    """wasmtime's text without its own backtrace (WasmTrap keeps the frames separately)."""
    _, sep, cause = message.rpartition("Caused by:")
    return cause.strip() if sep else message.strip()


# V8's messages for wasmtime's trap codes, as Envoy 1.40 logs them (checked by running a
# trapping plugin under Envoy for each).
_V8_TRAP_MESSAGES = {
    "unreachable": "Uncaught RuntimeError: unreachable",
    "integer_division_by_zero": "Uncaught RuntimeError: divide by zero",
    "integer_overflow": "Uncaught RuntimeError: divide result unrepresentable",
    "bad_conversion_to_integer": "Uncaught RuntimeError: float unrepresentable in integer range",
    "memory_out_of_bounds": "Uncaught RuntimeError: memory access out of bounds",
    "stack_overflow": "Uncaught RangeError: Maximum call stack size exceeded",
    "indirect_call_to_null": "Uncaught RuntimeError: function signature mismatch",
    "bad_signature": "Uncaught RuntimeError: function signature mismatch",
    "table_out_of_bounds": "Uncaught RuntimeError: table index is out of bounds",
    "heap_misaligned": "Uncaught RuntimeError: operation does not support unaligned accesses",
    # Not a V8 trap (Envoy has no CPU deadline): say what happened.
    "interrupt": "Uncaught RuntimeError: interrupted: the plugin exceeded its CPU deadline",
}
# i32.rem_s i32.rem_u i64.rem_s i64.rem_u: V8 says "remainder by zero" for these.
_REM_OPCODES = frozenset((0x6F, 0x70, 0x81, 0x82))


def _wasm_trap(trap: wasmtime.Trap, code: bytes) -> WasmTrap:
    trap_code = trap.trap_code
    name = trap_code.name.lower() if trap_code is not None else None
    frames = [WasmFrame(f.func_index, f.func_name, f.module_offset) for f in trap.frames]
    detail = _trap_reason(trap.message)
    message = _V8_TRAP_MESSAGES.get(name or "", detail if name is None else
                                    f"Uncaught RuntimeError: {detail}")
    if name == "integer_division_by_zero" and frames:
        offset = frames[0].module_offset
        if offset < len(code) and code[offset] in _REM_OPCODES:
            message = "Uncaught RuntimeError: remainder by zero"
    return WasmTrap(message, name, frames, detail)


def _context_address(ptr: Any) -> int:
    return ctypes.cast(ptr, c_void_p).value or 0


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class FuncSig(NamedTuple):
    params: tuple[str, ...]
    results: tuple[str, ...]


def with_signature(fn: HostFunction, params: tuple[str, ...],
                   results: tuple[str, ...] = ("i32",)) -> HostFunction:
    """Declare the wasm type of a host function (sets ``fn.wasm_signature``; decorate the
    function itself, bound methods forward the attribute). A module importing it with another
    type is then rejected at load, with Envoy's "import type mismatch" message."""
    fn.wasm_signature = FuncSig(tuple(params), tuple(results))  # type: ignore[attr-defined]
    return fn


def with_error_result(fn: HostFunction, on_error: Callable[[Exception], Any]) -> HostFunction:
    """Declare that an Exception raised by the host function ``fn`` (other than the WasmTrap of
    a nested guest call) is not a trap: ``on_error(exc)``, called while the exception is being
    handled, returns the call's result. Sets ``fn.wasm_on_error`` (wrap a bound method in
    functools.partial first: it cannot take attributes). A callback of on_error's own that
    raises traps as usual."""
    fn.wasm_on_error = on_error  # type: ignore[attr-defined]
    return fn


def _sig_text(sig: FuncSig) -> str:
    """cpp-host's rendering: "i32 i32 -> i32", an empty list as "void"."""
    return f"{' '.join(sig.params) or 'void'} -> {' '.join(sig.results) or 'void'}"


# ---------------------------------------------------------------------------------------------
# Signatures, read from the binary
# ---------------------------------------------------------------------------------------------
# wasmtime's C API reflection (wasm_valtype_kind & co.) aborts the whole process on types the
# wasm-c-api cannot name (v128, typed and GC references). A plugin must never be able to do
# that, so the signatures of imports and exports come from the module's own type, import,
# function and export sections; wasmtime is asked for import types only when they are plain.

_VALTYPE_NAMES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
                  0x70: "funcref", 0x6F: "externref"}
_PLAIN_TYPES = frozenset(("i32", "i64", "f32", "f64", "funcref", "externref"))
_REF = "ref"  # any other reference type (function-references / GC proposals)


class _Reader:
    """Just enough of the binary format to read signatures (the module is already validated)."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self) -> str:
        n = self.uleb()
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def valtype(self) -> str:
        b = self.byte()
        if b in (0x63, 0x64):  # (ref null? <heaptype>): the heap type is an s33
            self.uleb()
            return _REF
        return _VALTYPE_NAMES.get(b, _REF)

    def subtype(self) -> FuncSig | None:
        """One type definition: a function's signature, None for a struct or array (GC)."""
        if self.data[self.pos] in (0x50, 0x4F):  # sub / sub final, with supertypes
            self.byte()
            for _ in range(self.uleb()):
                self.uleb()
        form = self.byte()
        if form == 0x60:
            params = tuple(self.valtype() for _ in range(self.uleb()))
            return FuncSig(params, tuple(self.valtype() for _ in range(self.uleb())))
        for _ in range(self.uleb() if form == 0x5F else 1):  # struct fields / array element
            self.valtype()  # a storage type (packed i8/i16 are single bytes too)
            self.byte()  # mutability
        return None

    def limits(self) -> None:
        flags = self.byte()  # bit 0: has max; 1: shared; 2: 64-bit; 3: custom page size
        self.uleb()
        if flags & 1:
            self.uleb()
        if flags & 8:
            self.uleb()


def _read_signatures(code: bytes) -> tuple[list[tuple[str, str, str, FuncSig | None]],
                                           dict[str, FuncSig]]:
    """(imports as (module, name, kind, sig-for-functions), {function export: sig})."""
    types: list[FuncSig | None] = []  # None: a GC struct/array type
    imports: list[tuple[str, str, str, FuncSig | None]] = []
    func_types: list[FuncSig | None] = []  # the function index space: imports, then defined
    exports: dict[str, FuncSig] = {}
    r = _Reader(code, 8)
    while r.pos < len(code):
        section = r.byte()
        size = r.uleb()
        body = _Reader(code, r.pos, r.pos + size)
        r.pos += size
        if section == 1:  # types
            for _ in range(body.uleb()):
                if body.data[body.pos] == 0x4E:  # rec group: one type index per member
                    body.byte()
                    types.extend(body.subtype() for _ in range(body.uleb()))
                else:
                    types.append(body.subtype())
        elif section == 2:  # imports
            for _ in range(body.uleb()):
                module, field, kind = body.name(), body.name(), body.byte()
                if kind == 0x00:
                    idx = body.uleb()
                    sig = types[idx] if idx < len(types) else None
                    imports.append((module, field, "func", sig))
                    func_types.append(sig)
                elif kind == 0x01:
                    elem = body.valtype()
                    body.limits()
                    imports.append((module, field, "table" if elem in _PLAIN_TYPES else _REF,
                                    None))
                elif kind == 0x02:
                    body.limits()
                    imports.append((module, field, "memory", None))
                elif kind == 0x03:
                    t = body.valtype()
                    body.byte()
                    imports.append((module, field, "global" if t in _PLAIN_TYPES else _REF, None))
                else:  # 0x04 tag (exceptions)
                    body.byte()
                    body.uleb()
                    imports.append((module, field, "tag", None))
        elif section == 3:  # function declarations
            for _ in range(body.uleb()):
                idx = body.uleb()
                func_types.append(types[idx] if idx < len(types) else None)
        elif section == 7:  # exports
            for _ in range(body.uleb()):
                field, kind, idx = body.name(), body.byte(), body.uleb()
                if kind == 0x00:
                    sig = func_types[idx] if idx < len(func_types) else None
                    exports[field] = sig if sig is not None else FuncSig((_REF,), ())
    return imports, exports


class WasmModule:
    """Compiled code, shared by every VM of it in the process (any thread)."""

    def __init__(self, module: wasmtime.Module, code: bytes, sha256: str, name: str,
                 from_disk_cache: bool = False) -> None:
        self._module = module
        self._code = code  # trap messages look at the trapping instruction
        self.sha256 = sha256
        self.name = name
        self.from_disk_cache = from_disk_cache  # deserialized from cache_dir, not compiled
        imports, self.exports = _read_signatures(code)
        plain = all(kind in ("memory", "table", "global", "tag") or (
            kind == "func" and sig is not None and _REF not in sig.params + sig.results)
            for _, _, kind, sig in imports)
        if not plain:
            bad = next(f"{m}.{n}" for m, n, kind, sig in imports
                       if kind == _REF or (kind == "func" and (sig is None or _REF in sig.params
                                                               + sig.results)))
            raise WasmLoadError(f"Failed to load Wasm code {name!r}: import {bad} uses a typed or "
                                f"GC reference type, which is not supported")
        # (module, name, FuncSig, wasmtime type) in import order; only functions have a sig.
        self._imports: list[tuple[str, str, FuncSig | None, Any]] = [
            (m, n, sig, imp.type) for (m, n, _, sig), imp in zip(imports, module.imports)]
        self.imports: list[tuple[str, str, FuncSig]] = [
            (m, n, s) for m, n, s, _ in self._imports if s is not None]
        self.abi_version: str | None = None
        for export, version in _ABI_VERSION_EXPORTS.items():
            if export in self.exports:
                self.abi_version = version

    def __repr__(self) -> str:
        return (f"WasmModule(name={self.name!r}, sha256={self.sha256[:12]}..., "
                f"abi={self.abi_version})")


# Weak: compiled code lives as long as some VM (or caller) uses it, then a new version of a
# plugin does not keep the old one's code around.
_modules: weakref.WeakValueDictionary[str, WasmModule] = weakref.WeakValueDictionary()
_modules_lock = threading.Lock()
_CACHE_MAGIC = b"wasmproxy-cwasm-1\n"
_WASM_MAGIC = b"\0asm"


@functools.cache
def _cache_key() -> str:
    version = importlib.metadata.version("wasmtime")
    return hashlib.sha256(f"{version};{_ENGINE_SETTINGS}".encode()).hexdigest()[:16]


def _load_cached(path: str) -> wasmtime.Module | None:
    """Deserialize a cache file written by _store_cached, or None when it is missing or bad."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("wasm code cache: cannot read %s: %s", path, e)
        return None
    header = len(_CACHE_MAGIC) + 32
    payload = blob[header:]
    # Deserializing trusts the bytes: only hand wasmtime what we wrote ourselves, intact.
    if (len(blob) < header or not blob.startswith(_CACHE_MAGIC)
            or hashlib.sha256(payload).digest() != blob[len(_CACHE_MAGIC):header]):
        log.warning("wasm code cache: ignoring corrupt entry %s", path)
        return None
    try:
        return wasmtime.Module.deserialize(engine(), payload)
    except wasmtime.WasmtimeError as e:
        log.warning("wasm code cache: ignoring unusable entry %s: %s", path, e)
        return None


def _store_cached(path: str, module: wasmtime.Module) -> None:
    payload = module.serialize()
    blob = _CACHE_MAGIC + hashlib.sha256(payload).digest() + payload
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("wasm code cache: cannot write %s: %s", path, e)


def compile_module(code: bytes, *, cache_dir: str | None = None, name: str = "") -> WasmModule:
    """Any thread: compile ``code`` once per process (cached by sha256 while in use).

    With ``cache_dir`` (Envoy's ``allow_precompiled``) compiled code is also kept on disk, keyed
    by code hash, engine settings and wasmtime version; corrupt entries are ignored and rewritten.
    Raises WasmLoadError naming ``name`` for invalid or truncated code.
    """
    digest = hashlib.sha256(code).hexdigest()
    with _modules_lock:
        cached = _modules.get(digest)
    if cached is not None:
        return cached
    path = os.path.join(cache_dir, f"{digest}-{_cache_key()}.cwasm") if cache_dir else None
    module = _load_cached(path) if path else None
    from_disk_cache = module is not None
    if module is None:
        if not code.startswith(_WASM_MAGIC):
            # wasmtime-py would parse text as WAT; a plugin must be a binary, as in Envoy.
            raise WasmLoadError(f"Failed to load Wasm code {name!r}: not a Wasm binary "
                                f"(bad magic header {code[:4]!r})")
        try:
            module = wasmtime.Module(engine(), code)
        except wasmtime.WasmtimeError as e:
            detail = str(e).strip().replace("\n\n", "\n")
            raise WasmLoadError(f"Failed to load Wasm code {name!r}: {detail}") from None
        if path:
            _store_cached(path, module)
    wm = WasmModule(module, code, digest, name, from_disk_cache)
    with _modules_lock:
        return _modules.setdefault(digest, wm)


# ---------------------------------------------------------------------------------------------
# Linear memory
# ---------------------------------------------------------------------------------------------

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class WasmMemory:
    """Owner thread of the VM: bounds-checked access to the exported "memory".

    Reads copy out (``bytes``); writes copy in. Bounds are checked against the current size,
    which may have grown during any call; a bad pointer raises InvalidMemoryAccess.
    """

    __slots__ = ("_store", "_ctx", "_mem_addr", "_mem", "_view", "_size")

    def __init__(self, store: wasmtime.Store | None, ctx: int, mem: Any) -> None:
        self._store = store  # keeps the Store, hence the memory, alive as long as this view
        self._ctx = ctx
        self._mem = mem
        self._mem_addr = addressof(mem) if mem is not None else 0
        self._view = memoryview(b"")
        self._size = 0
        self._refresh()

    def _refresh(self) -> None:
        if not self._mem_addr:
            return
        size = _memory_data_size(self._ctx, self._mem_addr)
        if size != self._size:
            base = _memory_data(self._ctx, self._mem_addr)
            self._view = memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")
            self._size = size

    def _check(self, ptr: int, n: int) -> None:
        """Slow path: refresh after growth, then raise if the range is still out of bounds."""
        self._refresh()
        if not (0 <= ptr and 0 <= n and ptr + n <= self._size):
            raise InvalidMemoryAccess(
                f"wasm memory access out of bounds: ptr={ptr} size={n} memory={self._size}")

    def size(self) -> int:
        """Current size in bytes."""
        self._refresh()
        return self._size

    def in_bounds(self, ptr: int, n: int) -> bool:
        """Whether ptr..ptr+n lies in the memory (``ptr + n <= size()``, without asking
        wasmtime for the size when the cached one already holds the range)."""
        if 0 <= ptr and 0 <= n and ptr + n <= self._size:
            return True
        self._refresh()
        return 0 <= ptr and 0 <= n and ptr + n <= self._size

    def read(self, ptr: int, n: int) -> bytes:
        end = ptr + n
        if not (0 <= ptr <= end <= self._size):
            self._check(ptr, n)
        return self._view[ptr:end].tobytes()

    def view(self, ptr: int, n: int) -> memoryview:
        """``read(ptr, n)`` without the copy: a view of guest memory, good only until the guest
        runs again (or the memory grows). Copy from it at once and drop it."""
        end = ptr + n
        if not (0 <= ptr <= end <= self._size):
            self._check(ptr, n)
        return self._view[ptr:end]

    def read_two(self, ptr1: int, n1: int, ptr2: int, n2: int) -> tuple[bytes, bytes]:
        """``(read(ptr1, n1), read(ptr2, n2))`` in one call (host calls taking a key and a value)."""
        end1, end2 = ptr1 + n1, ptr2 + n2
        size = self._size
        if not (0 <= ptr1 <= end1 <= size):
            self._check(ptr1, n1)
        if not (0 <= ptr2 <= end2 <= self._size):
            self._check(ptr2, n2)
        view = self._view
        return view[ptr1:end1].tobytes(), view[ptr2:end2].tobytes()

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        end = ptr + len(data)
        if not (0 <= ptr <= end <= self._size):
            self._check(ptr, len(data))
        self._view[ptr:end] = data

    def write_two_u32(self, ptr1: int, value1: int, ptr2: int, value2: int) -> None:
        """``write_u32(ptr1, value1); write_u32(ptr2, value2)`` in one call (a pointer and a size)."""
        size = self._size
        if not (0 <= ptr1 and ptr1 + 4 <= size):
            self._check(ptr1, 4)
        _U32.pack_into(self._view, ptr1, value1 & 0xFFFFFFFF)
        if not (0 <= ptr2 and ptr2 + 4 <= self._size):
            self._check(ptr2, 4)
        _U32.pack_into(self._view, ptr2, value2 & 0xFFFFFFFF)

    def read_u32(self, ptr: int) -> int:
        if not (0 <= ptr and ptr + 4 <= self._size):
            self._check(ptr, 4)
        return _U32.unpack_from(self._view, ptr)[0]

    def write_u32(self, ptr: int, value: int) -> None:
        if not (0 <= ptr and ptr + 4 <= self._size):
            self._check(ptr, 4)
        _U32.pack_into(self._view, ptr, value & 0xFFFFFFFF)

    def read_u64(self, ptr: int) -> int:
        if not (0 <= ptr and ptr + 8 <= self._size):
            self._check(ptr, 8)
        return _U64.unpack_from(self._view, ptr)[0]

    def write_u64(self, ptr: int, value: int) -> None:
        if not (0 <= ptr and ptr + 8 <= self._size):
            self._check(ptr, 8)
        _U64.pack_into(self._view, ptr, value & 0xFFFFFFFFFFFFFFFF)

    def read_cstr(self, ptr: int, max_len: int = 1 << 20) -> bytes:
        """The NUL-terminated bytes at ptr (without the NUL); raises if none within max_len."""
        if not (0 <= ptr < self._size):
            self._check(ptr, 1)
        end = min(self._size, ptr + max_len)
        pos = ptr
        while pos < end:  # scan in chunks: strings are short, memory may be large
            chunk = self._view[pos:min(end, pos + 256)].tobytes()
            idx = chunk.find(b"\0")
            if idx >= 0:
                return self._view[ptr:pos + idx].tobytes()
            pos += len(chunk)
        raise InvalidMemoryAccess(f"no NUL terminator within {max_len} bytes at ptr={ptr}")


# ---------------------------------------------------------------------------------------------
# VMs
# ---------------------------------------------------------------------------------------------


def _views(buf: ctypes.Array, slots: int) -> dict[str, ctypes.Array]:
    return {t: (ct * (per * slots)).from_buffer(buf) for t, (ct, per) in _RAW_VIEW.items()}


class WasmVm:
    """One Store + Instance of a module, used only from the thread that created it.

    ``host_functions`` maps ``(module, name)`` to a Python callable for each function import
    (see the module docstring for value conventions). Unused entries are ignored; an import
    with no entry raises WasmLoadError "Failed to load Wasm module due to a missing import:
    env.proxy_foo" (Envoy's wording), and so does a global import; a host function declared
    with ``with_signature`` and imported with another type raises Envoy's "import type
    mismatch" error. Memory and table imports are created by the VM, as cpp-host does (the
    imported memory is ``.memory`` unless one is exported). A trapping start section raises
    WasmTrap.
    """

    def __init__(self, module: WasmModule, host_functions: Mapping[tuple[str, str], HostFunction],
                 *, name: str = "", memory_limit_bytes: int | None = MAX_WASM_MEMORY_SIZE_BYTES,
                 epoch_deadline_ticks: int | None = None) -> None:
        self.module = module
        self.name = name or module.name
        self.thread_id = threading.get_ident()
        self._host_functions = host_functions
        self._memory_limit_bytes = memory_limit_bytes
        self._deadline_ticks = epoch_deadline_ticks
        self._depth = 0  # nesting of deadline-armed guest entries (re-entrant host calls)
        self._host_error: BaseException | None = None
        self._trap_out = c_size_t(0)
        self._trap_out_addr = addressof(self._trap_out)
        self._functions: dict[str, Callable[..., Any]] = {}

        self._store = store = wasmtime.Store(engine())
        self._ctx = _context_address(store._context())
        if memory_limit_bytes is not None:
            store.set_limits(memory_size=memory_limit_bytes)
        _context_set_epoch_deadline(self._ctx, _NO_DEADLINE_TICKS)

        # Everything wasmtime may call back into or read from stays referenced here.
        self._keepalive: list[Any] = []
        n_imports = len(module._imports)
        externs = (_wffi.wasmtime_extern_t * max(n_imports, 1))()
        imported_memory: wasmtime.Memory | None = None
        for i, (mod_name, imp_name, sig, ty) in enumerate(module._imports):
            qualname = f"{mod_name}.{imp_name}"
            if isinstance(ty, (wasmtime.MemoryType, wasmtime.TableType)):
                # cpp-host (V8) creates an imported memory or table itself (Emscripten style).
                try:
                    if isinstance(ty, wasmtime.MemoryType):
                        imported_memory = wasmtime.Memory(store, ty)
                        externs[i] = imported_memory._as_extern()
                    else:
                        externs[i] = wasmtime.Table(store, ty, None)._as_extern()
                except wasmtime.WasmtimeError as e:
                    raise WasmLoadError(f"Failed to create import {qualname}: {e}") from None
                continue
            fn = host_functions.get((mod_name, imp_name)) if sig is not None else None
            if fn is None:  # no such host function, or a global/tag import (Envoy: the same)
                raise WasmLoadError(
                    f"Failed to load Wasm module due to a missing import: {qualname}")
            declared = getattr(fn, "wasm_signature", None)
            if declared is not None and declared != sig:
                raise WasmLoadError(
                    f"Failed to load Wasm module due to an import type mismatch: {qualname}, "
                    f"want: {_sig_text(sig)}, but host exports: {_sig_text(declared)}")
            cb = _HOST_CALLBACK(self._make_host_trampoline(qualname, fn, sig))
            externs[i].kind = _EXTERN_FUNC
            _func_new_unchecked(self._ctx, _context_address(ty.ptr()), cb, None, None,
                                addressof(externs[i].of.func))
            self._keepalive += (cb, ty)
        self._keepalive.append(externs)
        self._instance = _wffi.wasmtime_instance_t()
        trap = POINTER(_wffi.wasm_trap_t)()
        err = _wffi.wasmtime_instance_new(store._context(), module._module.ptr(), externs,
                                          n_imports, ctypes.byref(self._instance),
                                          ctypes.byref(trap))
        if trap:  # the module's start section trapped
            raise _wasm_trap(wasmtime.Trap._from_ptr(trap), module._code) from (
                self._take_host_error())
        if err:
            e = wasmtime.WasmtimeError._from_ptr(err)
            raise WasmLoadError(f"Failed to instantiate Wasm module {self.name!r}: {e}") from None
        mem = self._export("memory")
        if mem is not None and mem.kind == _EXTERN_MEMORY:
            self.memory = WasmMemory(store, self._ctx, mem.of.memory)
        elif imported_memory is not None:
            self.memory = WasmMemory(store, self._ctx, imported_memory._memory)
        else:
            self.memory = WasmMemory(None, self._ctx, None)

    def _export(self, name: str) -> Any:
        """The wasmtime_extern_t exported as ``name``, or None (one lookup, no reflection)."""
        ext = _wffi.wasmtime_extern_t()
        raw = name.encode()
        if not _instance_export_get(self._ctx, addressof(self._instance), raw, len(raw),
                                    addressof(ext)):
            return None
        return ext

    # -- calls into the guest ----------------------------------------------------------------

    def get_function(self, name: str) -> Callable[..., Any] | None:
        """Owner thread: a fast callable for the exported function ``name``, or None.

        Calling it raises WasmTrap if the guest traps (including an interrupted deadline).
        An export whose type uses something other than i32/i64/f32/f64 raises WasmLoadError.
        """
        fn = self._functions.get(name)
        if fn is None:
            sig = self.module.exports.get(name)
            if sig is None:
                return None
            ext = self._export(name)
            if ext is None or ext.kind != _EXTERN_FUNC:
                return None
            fn = self._make_call(name, ext.of.func, sig)
            self._functions[name] = fn
        return fn

    def _make_call(self, name: str, func_t: Any, sig: FuncSig) -> Callable[..., Any]:
        nparams, nresults = len(sig.params), len(sig.results)
        for t in sig.params + sig.results:
            if t not in _RAW_VIEW:
                raise WasmLoadError(f"{self.name}: export {name} uses unsupported type {t}")
        slots = max(nparams, nresults, 1)
        buf = (c_uint64 * (2 * slots))()  # wasmtime_val_raw_t[slots]: arguments in, results out
        views = _views(buf, slots)
        self._keepalive += (buf, func_t)
        func_addr, buf_addr = addressof(func_t), addressof(buf)
        ctx, trap_out, trap_out_addr = self._ctx, self._trap_out, self._trap_out_addr
        owner = self.thread_id
        get_ident = threading.get_ident
        call_unchecked, call_unchecked_gil = _func_call_prebuilt, _func_call_prebuilt_gil
        # Constant arguments of every call, converted once (see _func_call_prebuilt).
        a_ctx, a_func, a_buf, a_trap = (c_void_p(v) for v in (ctx, func_addr, buf_addr, trap_out_addr))
        a_slots = c_size_t(slots)
        enter_with_deadline = self._enter_with_deadline
        set_epoch_deadline = _context_set_epoch_deadline
        failed = self._call_failed
        vm = self

        def wrong_thread() -> AssertionError:
            return AssertionError(
                f"wasm vm {vm.name!r} used from a thread other than the one that created it")

        if len(set(sig.params)) <= 1 and nresults <= 1:
            # The Proxy-Wasm shape (all i32 in, zero or one result): everything inline.
            pview = views[sig.params[0] if nparams else "i32"]
            per = _RAW_VIEW[sig.params[0]][1] if nparams else 4
            stop = per * nparams
            rview = views[sig.results[0] if nresults else "i32"]

            def call(*args: Any) -> Any:
                if get_ident() != owner:
                    raise wrong_thread()
                pview[0:stop:per] = args  # raises ValueError on a wrong argument count
                ticks = vm._deadline_ticks
                if ticks is None:
                    err = call_unchecked(a_ctx, a_func, a_buf, a_slots, a_trap)
                else:
                    # _enter_with_deadline, inlined: this is every callback's path.
                    depth = vm._depth
                    if not depth:
                        set_epoch_deadline(ctx, ticks)
                    vm._depth = depth + 1
                    try:
                        err = call_unchecked_gil(a_ctx, a_func, a_buf, a_slots, a_trap)
                    finally:
                        vm._depth = depth
                if err or trap_out.value:
                    failed(name, err)
                return rview[0] if nresults else None
        else:
            targets = [(views[t], i * _RAW_VIEW[t][1]) for i, t in enumerate(sig.params)]
            sources = [(views[t], i * _RAW_VIEW[t][1]) for i, t in enumerate(sig.results)]

            def call(*args: Any) -> Any:
                if get_ident() != owner:
                    raise wrong_thread()
                if len(args) != nparams:
                    raise TypeError(f"{name}() takes {nparams} arguments ({len(args)} given)")
                for (v, idx), a in zip(targets, args):
                    v[idx] = a
                if vm._deadline_ticks is None:
                    err = call_unchecked(a_ctx, a_func, a_buf, a_slots, a_trap)
                else:
                    err = enter_with_deadline(func_addr, buf_addr, slots)
                if err or trap_out.value:
                    failed(name, err)
                if nresults == 1:
                    return sources[0][0][sources[0][1]]
                return tuple(v[idx] for v, idx in sources) if nresults else None

        call.__name__ = name
        call.__qualname__ = f"WasmVm.{name}"
        return call

    def _enter_with_deadline(self, func_addr: int, buf_addr: int, slots: int) -> int | None:
        """Re-arm the CPU deadline at the outermost entry only: a guest looping through
        re-entrant calls must not extend its own deadline."""
        if not self._depth:
            _context_set_epoch_deadline(self._ctx, self._deadline_ticks)
        self._depth += 1
        try:
            return _func_call_unchecked_gil(self._ctx, func_addr, buf_addr, slots, self._trap_out_addr)
        finally:
            self._depth -= 1

    def _take_host_error(self) -> BaseException | None:
        """The exception a host callable raised during the failed call, if any (consumed).

        KeyboardInterrupt/SystemExit are re-raised as themselves once wasm has unwound."""
        cause, self._host_error = self._host_error, None
        if cause is not None and not isinstance(cause, Exception):
            raise cause
        return cause

    def _call_failed(self, name: str, err: int | None) -> None:
        """Turn wasmtime's error/trap out-parameters into a WasmTrap (and consume them)."""
        trap_ptr, self._trap_out.value = self._trap_out.value, 0
        cause = self._take_host_error()
        if not err:
            trap = wasmtime.Trap._from_ptr(ctypes.cast(trap_ptr, POINTER(_wffi.wasm_trap_t)))
            raise _wasm_trap(trap, self.module._code) from cause
        # A trap raised by a host function comes back as an error with a wasm backtrace.
        error = wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, POINTER(_wffi.wasmtime_error_t)))
        frame_list = _FrameList(error)
        _wffi.wasmtime_error_wasm_trace(error.ptr(), ctypes.byref(frame_list.vec))
        frames = [WasmFrame(f.func_index, f.func_name, f.module_offset)
                  for f in (_Frame._from_ptr(frame_list.vec.data[i], frame_list)
                            for i in range(frame_list.vec.size))]
        if isinstance(cause, WasmTrap):
            # A re-entrant call trapped and the host function let it propagate: the same trap
            # (wasmtime's backtrace of it already spans the outer activation's frames).
            raise WasmTrap(cause.message, cause.trap_code, cause.frames, cause.detail) from cause
        raise WasmTrap(_trap_reason(str(error)), None, frames) from cause

    # -- calls from the guest ----------------------------------------------------------------

    def _make_host_trampoline(self, qualname: str, fn: HostFunction,
                              sig: FuncSig) -> Callable[[int, int, int, int], int]:
        nparams, nresults = len(sig.params), len(sig.results)
        slots = max(nparams, nresults, 1)
        host_trap = self._host_trap
        for t in sig.params + sig.results:
            if t not in _RAW_VIEW:
                raise WasmLoadError(f"{self.name}: import {qualname} uses unsupported type {t}")
        # with_error_result: an Exception of fn itself (not a nested guest call's WasmTrap, not
        # a bad result) becomes on_error(e) instead of a trap. The inner try is free when
        # nothing is raised, which saves the wrapper's frame on every host call.
        on_error: Callable[[Exception], Any] | None = getattr(fn, "wasm_on_error", None)

        def error_result(e: Exception) -> Any:
            """fn raised `e`: its with_error_result value, or `e` propagates (to become a trap)."""
            if on_error is None or isinstance(e, WasmTrap):
                raise e
            return on_error(e)

        if set(sig.params + sig.results) <= {"i32"} and nresults <= 1:
            # The common case (every Proxy-Wasm import but a few): one u32 view over the array.
            arr_t = c_uint32 * (4 * slots)
            from_address = arr_t.from_address
            if nparams == 0:
                def read_args(a: Any) -> tuple:
                    return ()
            elif nparams == 1:
                def read_args(a: Any) -> tuple:
                    return (a[0],)
            else:
                read_args = itemgetter(*range(0, 4 * nparams, 4))

            if nresults == 0:
                def trampoline(env: int, caller: int, args: int, nargs: int) -> int:
                    try:
                        params = read_args(from_address(args))
                        try:
                            fn(*params)
                        except Exception as e:
                            error_result(e)
                        return 0
                    except BaseException as e:
                        return host_trap(qualname, e)
            else:
                def trampoline(env: int, caller: int, args: int, nargs: int) -> int:
                    try:
                        a = from_address(args)
                        params = read_args(a)
                        try:
                            r = fn(*params)
                        except Exception as e:
                            r = error_result(e)
                        a[0] = r
                        return 0
                    except BaseException as e:
                        return host_trap(qualname, e)
            return trampoline

        if set(sig.params + sig.results) <= {"i32", "i64"} and nresults <= 1:
            # i64 metrics, WASI clock/seek: one i64 view; an i32 is the low half of its slot
            # (wasm stores only 4 bytes, the upper ones are not defined).
            i64_from_address = (c_int64 * (2 * slots)).from_address
            masks = [0xFFFFFFFF if t == "i32" else -1 for t in sig.params]  # -1 & v == v
            slots_idx = range(0, 2 * nparams, 2)
            # The slots as a tuple (itemgetter of one index gives the bare value), masked by
            # map(): no Python frame per call.
            if nparams > 1:
                get_slots = itemgetter(*slots_idx)
            elif nparams == 1:
                def get_slots(a: Any) -> tuple:
                    return (a[0],)
            else:
                def get_slots(a: Any) -> tuple:
                    return ()

            def trampoline(env: int, caller: int, args: int, nargs: int) -> int:
                try:
                    a = i64_from_address(args)
                    params = map(int.__and__, get_slots(a), masks)
                    try:
                        r = fn(*params)
                    except Exception as e:
                        r = error_result(e)
                    if nresults:
                        a[0] = r
                    return 0
                except BaseException as e:
                    return host_trap(qualname, e)
            return trampoline

        # Floats or several results (no Proxy-Wasm import has either): a view per type.
        view_types = {t: (ct * (per * slots)) for t, (ct, per) in _RAW_VIEW.items()}
        param_src = [(view_types[t], i * _RAW_VIEW[t][1]) for i, t in enumerate(sig.params)]
        result_dst = [(view_types[t], i * _RAW_VIEW[t][1]) for i, t in enumerate(sig.results)]

        def trampoline(env: int, caller: int, args: int, nargs: int) -> int:
            try:
                params = [vt.from_address(args)[idx] for vt, idx in param_src]
                try:
                    r = fn(*params)
                except Exception as e:
                    r = error_result(e)
                if nresults == 1:
                    vt, idx = result_dst[0]
                    vt.from_address(args)[idx] = r
                elif nresults:
                    for (vt, idx), v in zip(result_dst, r, strict=True):
                        vt.from_address(args)[idx] = v
                return 0
            except BaseException as e:
                return host_trap(qualname, e)
        return trampoline

    def _host_trap(self, qualname: str, e: BaseException) -> int:
        """A host callable raised: log it and turn it into a trap of the current guest call."""
        if isinstance(e, WasmTrap):
            msg = e.message  # a re-entrant guest call trapped: the same trap, one level up
        else:
            msg = f"host function {qualname} raised {type(e).__name__}: {e}"
            log.error("wasm vm %r: %s", self.name, msg, exc_info=e)
        if self._host_error is None:
            self._host_error = e
        data = msg.encode("utf-8", "replace")
        return _trap_new(data, len(data))

    # -- lifecycle ---------------------------------------------------------------------------

    def clone(self, host_functions: Mapping[tuple[str, str], HostFunction] | None = None,
              *, name: str | None = None) -> WasmVm:
        """Any thread: a fresh Store + Instance of the same module, owned by the calling thread.

        It shares nothing with this VM but the compiled code (globals and memory start anew),
        and uses the same host functions unless others are given (host callables that close
        over per-VM state should be given anew).
        """
        if host_functions is None:
            host_functions = self._host_functions
        return WasmVm(self.module, host_functions,
                      name=self.name if name is None else name,
                      memory_limit_bytes=self._memory_limit_bytes,
                      epoch_deadline_ticks=self._deadline_ticks)

    def set_epoch_deadline_ticks(self, ticks: int | None) -> None:
        """Owner thread: give each outermost guest entry ``ticks`` epoch ticks (None: no limit)."""
        self._deadline_ticks = ticks
        if ticks is None:
            _context_set_epoch_deadline(self._ctx, _NO_DEADLINE_TICKS)

    def __repr__(self) -> str:
        return f"WasmVm(name={self.name!r}, module={self.module!r})"
