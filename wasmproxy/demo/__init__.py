"""The embedded demo: a config, an example plugin and an echo upstream, so `wasmproxy` works out of the box."""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))


def demo_config_text(upstream_port: int) -> str:
    """The demo bootstrap YAML with the plugin path and the echo upstream's port filled in."""
    with open(os.path.join(DEMO_DIR, "demo.yaml"), encoding="utf-8") as f:
        text = f.read()
    return text.replace("{demo_dir}", DEMO_DIR).replace("{upstream_port}", str(upstream_port))
