"""An envoy.extensions.wasm.v3.PluginConfig from Python arguments (what a plugin's YAML says)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import any_pb2, message, wrappers_pb2

__all__ = ["Configuration", "FAILURE_POLICIES", "plugin_config"]

#: A plugin or VM configuration: text (StringValue), bytes (BytesValue) or any proto message.
Configuration = Union[str, bytes, message.Message, None]
FAILURE_POLICIES = ("FAIL_CLOSED", "FAIL_RELOAD", "FAIL_OPEN")


def _pack(value: Configuration) -> any_pb2.Any | None:
    if value is None:
        return None
    packed = any_pb2.Any()
    if isinstance(value, str):
        packed.Pack(wrappers_pb2.StringValue(value=value))
    elif isinstance(value, (bytes, bytearray)):
        packed.Pack(wrappers_pb2.BytesValue(value=bytes(value)))
    else:
        packed.Pack(value)
    return packed


def plugin_config(
    wasm: str | Path | bytes,
    configuration: Configuration = None,
    *,
    vm_configuration: Configuration = None,
    name: str | None = None,
    root_id: str = "",
    vm_id: str = "",
    failure_policy: str = "FAIL_CLOSED",
    reload_backoff_ms: int | None = None,
    allow_on_headers_stop_iteration: bool | None = None,
    environment_variables: Mapping[str, str] | None = None,
) -> wasm_pb2.PluginConfig:
    """`wasm` is a .wasm path (vm_config.code.local.filename) or the module's bytes (inline);
    the name defaults to the file's stem ("plugin" for bytes)."""
    if failure_policy not in FAILURE_POLICIES:
        raise ValueError(f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}")
    inline = isinstance(wasm, (bytes, bytearray))
    proto = wasm_pb2.PluginConfig(name=name or ("plugin" if inline else Path(wasm).stem), root_id=root_id)
    proto.failure_policy = wasm_pb2.FailurePolicy.Value(failure_policy)
    vm = proto.vm_config
    vm.vm_id = vm_id
    vm.runtime = "envoy.wasm.runtime.v8"
    if isinstance(wasm, (bytes, bytearray)):
        vm.code.local.inline_bytes = bytes(wasm)
    else:
        vm.code.local.filename = str(wasm)
    packed = _pack(configuration)
    if packed is not None:
        proto.configuration.CopyFrom(packed)
    packed = _pack(vm_configuration)
    if packed is not None:
        vm.configuration.CopyFrom(packed)
    if reload_backoff_ms is not None:
        proto.reload_config.backoff.base_interval.FromMilliseconds(reload_backoff_ms)
    if allow_on_headers_stop_iteration is not None:
        proto.allow_on_headers_stop_iteration.value = allow_on_headers_stop_iteration
    if environment_variables:
        vm.environment_variables.key_values.update(environment_variables)
    return proto
