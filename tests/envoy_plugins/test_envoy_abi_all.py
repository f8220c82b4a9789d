"""Real Envoy 1.40 with abi_all: the status every ABI 0.2.1 host function returns, error cases
included (the table wasmproxy's host must reproduce)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy

# Status codes: 0 OK, 1 NOT_FOUND, 2 BAD_ARGUMENT, 4 PARSE_FAILURE, 7 EMPTY, 8 CAS_MISMATCH.
EXPECTED_REQUEST_PHASE = {
    "log": 0, "log-bad-level": 2, "get_log_level": 0, "get_current_time_nanoseconds": 0,
    "set_tick_period_milliseconds": 0, "set_effective_context": 0, "set_effective_context-unknown": 2, "done": 1,
    "get_buffer_bytes-request_body": 0, "get_buffer_bytes-plugin_configuration": 1,
    "get_buffer_bytes-vm_configuration": 0, "get_buffer_bytes-bad_type": 2,
    "set_buffer_bytes-request_body": 2, "set_buffer_bytes-bad_type": 2, "get_buffer_status-request_body": 0,
    "get_buffer_status-bad_type": 2, "get_header_map_size": 0, "get_header_map_size-bad_type": 2,
    "get_header_map_pairs": 0, "get_header_map_pairs-bad_type": 2, "set_header_map_pairs": 0,
    "set_header_map_pairs-bad_type": 2, "get_header_map_value": 0, "get_header_map_value-missing": 1,
    "get_header_map_value-bad_type": 2, "add_header_map_value": 0, "add_header_map_value-bad_type": 2,
    "replace_header_map_value": 0, "replace_header_map_value-bad_type": 2, "remove_header_map_value": 0,
    "remove_header_map_value-missing": 0, "remove_header_map_value-bad_type": 2, "http_call": 0,
    "http_call-unknown_cluster": 2, "http_call-no_path": 2, "grpc_call-unknown_cluster": 4,
    "grpc_stream-unknown_cluster": 4, "grpc_send-unknown_token": 2, "grpc_cancel-unknown_token": 2,
    "grpc_close-unknown_token": 2, "set_shared_data": 0, "get_shared_data": 0, "set_shared_data-cas_mismatch": 8,
    "get_shared_data-missing": 1, "register_shared_queue": 0, "resolve_shared_queue": 0,
    "resolve_shared_queue-missing": 1, "enqueue_shared_queue": 0, "enqueue_shared_queue-unknown": 1,
    "dequeue_shared_queue": 0, "dequeue_shared_queue-empty": 7, "dequeue_shared_queue-unknown": 1,
    "define_metric": 0, "define_metric-bad_type": 2, "increment_metric": 0, "increment_metric-unknown": 1,
    "record_metric": 0, "record_metric-unknown": 1, "get_metric": 0, "get_metric-unknown": 1, "get_property": 0,
    "get_property-missing": 1, "set_property": 0, "call_foreign_function-unknown": 1,
    "call_foreign_function-clear_route_cache": 0,
    # Continuing a stream that is not paused, inside its own request-headers callback, is OK, but
    # afterwards Envoy no longer lets the plugin read the request headers.
    "continue_stream-not_paused": 0, "probe-after-continue_stream": 2, "continue_stream-bad_type": 2,
    "close_stream-bad_type": 2, "get_status": 0,
}
EXPECTED_RESPONSE_PHASE = {
    "get_buffer_status-response_body-response": 0, "get_header_map_value-request_headers-response": 2,
}


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    with EnvoyRun([Listener("abi_all", [wasm_filter(plugin("abi_all"), "cfg", vm_id="abi")])], proxy=proxy) as run:
        yield run


def _statuses(r: Response) -> dict[str, int]:
    return {k.removeprefix("x-abi-"): int(v) for k, v in r.headers if k.startswith("x-abi-")}


def test_every_host_function_status(envoy: EnvoyRun) -> None:
    r = envoy.request("abi_all", headers={"x-abi-remove-me": "1"})
    assert r.status == 200
    assert _statuses(r) == {**EXPECTED_REQUEST_PHASE, **EXPECTED_RESPONSE_PHASE}
    assert r.echo_header("x-abi-added") == "1" and r.echo_header("x-abi-replaced") == "2"
    assert r.echo_header("x-abi-remove-me") is None


def test_reports_in_a_local_reply(envoy: EnvoyRun) -> None:
    r = envoy.request("abi_all", headers={"x-abi-send-local-response": "418"})
    assert (r.status, r.body) == (418, b"abi_all")
    assert _statuses(r) == EXPECTED_REQUEST_PHASE  # on_response_headers adds nothing to a local reply
