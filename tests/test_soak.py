"""The soak script, short: 3000 requests through wasmproxy (2 workers) with plugin traps under
FAIL_RELOAD, upstream faults and client aborts. Every request is answered or failed per policy,
none hangs, and the Wasm VM and context gauges are back to their baseline afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_short_soak_answers_everything_and_leaks_no_vm_or_context() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--requests", "3000", "--warmup", "500", "--json"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, report
    assert report["hung"] == 0 and report["mismatch"] == 0, report["examples"]
    assert report["answered_or_failed_per_policy"] == 3000
    assert report["gauges_end"] == report["gauges_baseline"]
    outcomes = report["outcomes"]
    # The mix really exercised traps, upstream faults and aborts, and FAIL_RELOAD reloaded.
    for key in ("trap:503", "trap_resp:503", "reset:503", "status:500", "abort:aborted", "ok:200"):
        assert outcomes.get(key, 0) > 0, (key, outcomes)
    assert report["vm_reloads"]["wasm.soak.vm_reload_success"] > 0
