"""Unit tests for the Wasm-area fixes the conformance suite found (tests/test_conformance.py)."""

from __future__ import annotations

import pytest

from wasmproxy.wasm.context import Buffer
from wasmproxy.wasm.abi import WasmResult


@pytest.mark.parametrize(("start", "length", "value", "result"), [
    (0, 0, b"XY", b"XYabcdef"),      # prepend
    (0, 2, b"XY", b"XYcdef"),        # drain the first 2 bytes, then prepend (Envoy Buffer::copyFrom)
    (0, 3, b"", b"def"),             # drain only
    (0, 100, b"new", b"new"),        # drain everything
    (6, 0, b"!", b"abcdef!"),        # append
])
def test_set_buffer_bytes_at_the_start_drains_then_prepends(start: int, length: int, value: bytes,
                                                             result: bytes) -> None:
    buf = Buffer(bytearray(b"abcdef"))
    assert buf.copy_from(start, length, value) == WasmResult.Ok
    assert bytes(buf.data) == result


def test_set_buffer_bytes_in_the_middle_is_refused() -> None:
    buf = Buffer(bytearray(b"abcdef"))
    assert buf.copy_from(3, 2, b"X") == WasmResult.BadArgument
    assert bytes(buf.data) == b"abcdef"
