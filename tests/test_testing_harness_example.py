"""The worked example (examples/test_demo_plugin.py) runs and passes, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_worked_example_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/test_demo_plugin.py", "-p", "wasmproxy.testing.pytest_plugin",
         "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT / "examples")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
