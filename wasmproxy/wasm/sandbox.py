"""Limits on what a plugin may do to the host: CPU per callback, memory per VM, capabilities.

Envoy has no CPU deadline (a looping plugin hangs its worker until the watchdog kills the
process); wasmproxy interrupts a callback that runs longer than ``--wasm-callback-deadline-ms``
(wasmtime epoch interruption: a trap "interrupted"), so the looping plugin fails only the
request it is in, per its failure policy, and the worker keeps serving. Memory is capped per VM
like cpp-host's PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES (1 GiB; ``--wasm-memory-limit-mb``):
``memory.grow`` past it returns -1 to the guest. Start-up calls (start functions,
proxy_on_vm_start, proxy_on_configure) get a longer deadline, STARTUP_DEADLINE_MS.

Capabilities are cpp-host's capability restriction (WasmBase::registerCallbacks /
getFunctions, include/proxy-wasm/exports.h): with a non-empty
``capability_restriction_config.allowed_capabilities``, a Proxy-Wasm host function not listed
is linked as a stub that logs "Attempted call to restricted proxy-wasm capability: <name>" and
returns InternalFailure; a WASI function not listed logs "... restricted WASI capability:
<name>" and returns errno 76 (ENOTCAPABLE); a ``proxy_on_*`` callback not listed is treated as
not exported. An empty map allows everything.

Public API::

    SandboxLimits(callback_deadline_ms=100, memory_limit_bytes=1 GiB)
        .epoch_deadline_ticks -> int | None        # None: no CPU deadline
        .startup_deadline_ticks -> int | None      # start functions, on_vm_start, on_configure
    limits_for(factory_context) -> SandboxLimits    # extras["wasm_sandbox"], else the defaults
    ensure_epoch_ticker() -> None                   # any thread: the process-wide 10 ms ticker
    capability_allowed(allowed, name) -> bool
    restrict_host_functions(functions, allowed, log_error) -> dict   # stubs for the refused
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..log import get_logger
from .abi import WasmResult
from .runtime import MAX_WASM_MEMORY_SIZE_BYTES, EpochTicker, HostFunction, with_signature
from .wasi import WASI_MODULES

__all__ = [
    "DEFAULT_CALLBACK_DEADLINE_MS",
    "EPOCH_TICK_MS",
    "FACTORY_CONTEXT_KEY",
    "STARTUP_DEADLINE_MS",
    "SandboxLimits",
    "capability_allowed",
    "ensure_epoch_ticker",
    "limits_for",
    "restrict_host_functions",
]

_log = get_logger("wasm")

DEFAULT_CALLBACK_DEADLINE_MS = 100
# Start-up (``_initialize``/``_start``/``main``, proxy_on_vm_start, proxy_on_configure) may
# legitimately take longer (language runtimes initialize there; a loaded machine is slow), but
# must not hang the main thread either: it gets this deadline instead, when deadlines are on.
STARTUP_DEADLINE_MS = 10_000
# The epoch ticker's period: a deadline of N ms is ceil(N / EPOCH_TICK_MS) + 1 ticks, so a
# callback always gets at least its deadline and at most one tick more.
EPOCH_TICK_MS = 10
# Where the server puts the process-wide limits from the command line.
FACTORY_CONTEXT_KEY = "wasm_sandbox"

# WASI errno ENOTCAPABLE (cpp-host's stub for a restricted WASI function).
_WASI_ENOTCAPABLE = 76


@dataclass(frozen=True)
class SandboxLimits:
    """Process-wide limits every Wasm VM gets (from --wasm-callback-deadline-ms /
    --wasm-memory-limit-mb). ``callback_deadline_ms=0`` disables the CPU deadline."""

    callback_deadline_ms: int = DEFAULT_CALLBACK_DEADLINE_MS
    memory_limit_bytes: int = MAX_WASM_MEMORY_SIZE_BYTES

    @property
    def epoch_deadline_ticks(self) -> int | None:
        if self.callback_deadline_ms <= 0:
            return None
        return math.ceil(self.callback_deadline_ms / EPOCH_TICK_MS) + 1

    @property
    def startup_deadline_ticks(self) -> int | None:
        if self.callback_deadline_ms <= 0:
            return None
        return math.ceil(max(STARTUP_DEADLINE_MS, self.callback_deadline_ms) / EPOCH_TICK_MS) + 1


def limits_for(factory_context: Any) -> SandboxLimits:
    """The limits a FactoryContext carries (``extras["wasm_sandbox"]``), else the defaults."""
    extras = getattr(factory_context, "extras", None) or {}
    limits = extras.get(FACTORY_CONTEXT_KEY)
    return limits if isinstance(limits, SandboxLimits) else SandboxLimits()


_ticker: EpochTicker | None = None
_ticker_lock = threading.Lock()


def ensure_epoch_ticker() -> None:
    """Any thread: start the process-wide epoch ticker once (a native timer thread; it lives as
    long as the process, as the engine it ticks does)."""
    global _ticker
    if _ticker is None:
        with _ticker_lock:
            if _ticker is None:
                _ticker = EpochTicker(EPOCH_TICK_MS / 1000.0).start()


def capability_allowed(allowed: frozenset[str], name: str) -> bool:
    """cpp-host WasmBase::capabilityAllowed: everything when no restriction is configured."""
    return not allowed or name in allowed


def _stub(name: str, signature: Any, result: int | None, what: str,
          log_error: Callable[[str], None]) -> HostFunction:
    message = f"Attempted call to restricted {what} capability: {name}"

    def stub(*args: int) -> int | None:
        log_error(message)
        return result

    stub.__name__ = f"{name}_stub"
    if signature is not None:
        with_signature(stub, signature.params, signature.results)
    return stub


def restrict_host_functions(functions: Mapping[tuple[str, str], HostFunction], allowed: frozenset[str],
                            log_error: Callable[[str], None] | None = None) -> dict[tuple[str, str], HostFunction]:
    """`functions` with every Proxy-Wasm (``env.proxy_*``) and WASI function outside `allowed`
    replaced by cpp-host's stub. Other imports (Emscripten helpers, Envoy's own) are kept."""
    if log_error is None:
        log_error = _log.error
    result = dict(functions)
    if not allowed:
        return result
    for (module, name), fn in functions.items():
        if name in allowed:
            continue
        signature = getattr(fn, "wasm_signature", None)
        if module == "env" and name.startswith("proxy_"):
            result[(module, name)] = _stub(name, signature, int(WasmResult.InternalFailure), "proxy-wasm", log_error)
        elif module in WASI_MODULES:
            # proc_exit has no result: its stub only logs.
            has_result = signature is None or bool(signature.results)
            result[(module, name)] = _stub(name, signature, _WASI_ENOTCAPABLE if has_result else None, "WASI",
                                           log_error)
    return result
