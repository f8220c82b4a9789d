"""pytest plugin (entry point ``pytest11: wasmproxy``): the ``wasm_plugin`` fixture.

``wasm_plugin(path_or_bytes, configuration=None, **options)`` loads a plugin with
`wasmproxy.testing.WasmPlugin` and closes every plugin it made when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

from .harness import WasmPlugin

__all__ = ["wasm_plugin"]


@pytest.fixture
def wasm_plugin() -> Iterator[Callable[..., WasmPlugin]]:
    """A factory of WasmPlugins, all closed at teardown."""
    made: list[WasmPlugin] = []

    def load(wasm: Any, configuration: Any = None, **options: Any) -> WasmPlugin:
        plugin = WasmPlugin(wasm, configuration, **options)
        made.append(plugin)
        return plugin

    yield load
    for plugin in reversed(made):
        plugin.close()
