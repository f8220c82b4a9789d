"""ABI constants, version detection and the per-version host-function list."""

from __future__ import annotations

import pytest

from tests.wasm_host.guest import Guest
from wasmproxy.wasm.abi import (
    HOST_FUNCTIONS,
    AbiVersion,
    AbiVersionError,
    WasmResult,
    detect_abi_version,
    host_function_names,
)


def test_status_codes_are_the_specs() -> None:
    assert [(r.name, r.value) for r in WasmResult] == [
        ("Ok", 0), ("NotFound", 1), ("BadArgument", 2), ("SerializationFailure", 3), ("ParseFailure", 4),
        ("BadExpression", 5), ("InvalidMemoryAccess", 6), ("Empty", 7), ("CasMismatch", 8),
        ("ResultMismatch", 9), ("InternalFailure", 10), ("BrokenConnection", 11), ("Unimplemented", 12)]


@pytest.mark.parametrize(("marker", "version"), [
    ("proxy_abi_version_0_1_0", AbiVersion.ProxyWasm_0_1_0),
    ("proxy_abi_version_0_2_0", AbiVersion.ProxyWasm_0_2_0),
    ("proxy_abi_version_0_2_1", AbiVersion.ProxyWasm_0_2_1),
])
def test_detect_abi_version(marker: str, version: AbiVersion) -> None:
    assert detect_abi_version(["memory", marker, "malloc"]) == version


def test_missing_abi_version_is_a_load_error() -> None:
    with pytest.raises(AbiVersionError, match="Missing or unknown Proxy-Wasm ABI version"):
        detect_abi_version(["memory", "proxy_abi_version_9_9_9"])


def test_host_function_lists_per_version() -> None:
    common = {"proxy_" + n for n in HOST_FUNCTIONS}
    assert len(common) == 36
    v010 = set(host_function_names(AbiVersion.ProxyWasm_0_1_0))
    v020 = set(host_function_names(AbiVersion.ProxyWasm_0_2_0))
    v021 = set(host_function_names(AbiVersion.ProxyWasm_0_2_1))
    extras = {"envoy_resolve_dns", "pthread_equal", "emscripten_notify_memory_growth"}
    assert v010 - common - extras == {"proxy_get_configuration", "proxy_continue_request",
                                      "proxy_continue_response", "proxy_clear_route_cache"}
    assert v020 - common - extras == {"proxy_continue_stream", "proxy_close_stream"}
    assert v021 - common - extras == {"proxy_continue_stream", "proxy_close_stream", "proxy_get_log_level"}


@pytest.mark.parametrize("abi", [AbiVersion.ProxyWasm_0_1_0, AbiVersion.ProxyWasm_0_2_0, AbiVersion.ProxyWasm_0_2_1])
def test_the_host_table_provides_exactly_the_versions_env_functions(abi: AbiVersion) -> None:
    g = Guest(abi)
    assert g.wasm.vm is not None
    from wasmproxy.wasm import hostcalls
    from wasmproxy.wasm.wasi import env_runtime_host_functions

    table = {**hostcalls.host_functions(g.wasm), **env_runtime_host_functions()}
    assert {name for module, name in table if module == "env"} == set(host_function_names(abi))
