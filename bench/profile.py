"""Profile wasmproxy under wrk load with py-spy and print the frames that dominate.

Run: .venv/bin/python bench/profile.py [--scenario none|headers|...] [--duration 4] [--keep stacks.txt]
(py-spy: `.venv/bin/pip install py-spy`; it needs ptrace rights over the child, e.g. root.)
Starts the bench upstream and wasmproxy (--concurrency 1), loads it with wrk while py-spy samples
every thread (idle frames dropped), and prints the top frames by own time and by inclusive time,
as a percentage of the samples taken on the worker thread.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.harness import SCENARIOS, check_once, nginx_upstream, proxy_config, run_wrk  # noqa: E402
from tests.support.processes import WasmproxyProcess  # noqa: E402


def frame_name(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'module.py:func' (py-spy raw frames carry line numbers)."""
    func, _, where = frame.partition(" (")
    return f"{Path(where.split(':')[0]).name}:{func}" if where else func


def summarize(collapsed: str, top: int) -> str:
    """Own-time and inclusive-time tables from py-spy's collapsed stacks ('a;b;c count' lines)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return "no samples"
    out = [f"{total} samples (busy, all threads)", "", "own time:"]
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="none", choices=sorted(SCENARIOS))
    ap.add_argument("--duration", type=int, default=4, help="seconds of load and sampling")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--native", action="store_true",
                    help="also sample C frames (wasmtime, uvloop); pauses the process per sample")
    ap.add_argument("--keep", help="also copy py-spy's collapsed stacks here (for a flame graph tool)")
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    scenario = SCENARIOS[args.scenario]
    with tempfile.TemporaryDirectory(prefix="wasmproxy-profile-") as tmp, nginx_upstream(1) as upstream:
        config, port = proxy_config(scenario, upstream.port, Path(tmp))
        with WasmproxyProcess(config, concurrency=1, log_level="error") as proxy:
            problem = check_once(port, scenario)
            if problem:
                print(f"check failed: {problem}", file=sys.stderr)
                return 1
            run_wrk(port, scenario, args.connections, 1, latency=False)  # warm-up
            raw = Path(tmp) / "profile.txt"
            record = [py_spy, "record", "--pid", str(proxy.pid), "--duration", str(args.duration),
                      "--rate", "250",
                      *(["--native"] if args.native else ["--nonblocking"]), "--format", "raw", "-o", str(raw)]
            load = threading.Thread(target=run_wrk, args=(port, scenario, args.connections, args.duration + 1, True))
            load.start()
            subprocess.run(record, check=True, capture_output=True)
            load.join()
            if args.keep:
                shutil.copyfile(raw, args.keep)
            print(f"scenario {scenario.name}, wasmproxy --concurrency 1, wrk -c{args.connections}")
            print(summarize(raw.read_text(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
