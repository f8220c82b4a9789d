"""Profile wasmproxy under wrk load and print the frames that dominate.

Run: .venv/bin/python bench/profile.py [--scenario none|headers|...] [--duration 4] [--keep stacks.txt]
     .venv/bin/python bench/profile.py --cprofile [--scenario headers]
Starts the bench upstream and wasmproxy (--concurrency 1) and loads it with wrk.

* Default: py-spy (`.venv/bin/pip install py-spy`; needs ptrace rights, e.g. root) samples every
  thread (idle frames dropped); prints the top frames by own and by inclusive time, as a
  percentage of the samples.
* ``--cprofile``: the worker thread runs under cProfile (deterministic, slower); prints the top
  functions by own wall time per request with their calls per request. Own time of a function
  that calls into wasmtime through ctypes includes the guest's run and the wait for the GIL.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.harness import SCENARIOS, check_once, nginx_upstream, parse_wrk, proxy_config, run_wrk  # noqa: E402
from tests.support.processes import WasmproxyProcess  # noqa: E402

# Runs wasmproxy's CLI with each worker thread under cProfile; stats dumped when the worker ends.
_CPROFILE_MAIN = """
import cProfile, runpy, sys, wasmproxy.server as server
run = server.Worker._run
def profiled(self):
    profile = cProfile.Profile()
    profile.enable()
    try:
        run(self)
    finally:
        profile.disable()
        profile.dump_stats(%r)
server.Worker._run = profiled
sys.argv[0] = "wasmproxy"
runpy.run_module("wasmproxy", run_name="__main__", alter_sys=True)
"""


class _CProfiledWasmproxy(WasmproxyProcess):
    def __init__(self, config: Path, stats_path: Path) -> None:
        super().__init__(config, concurrency=1, log_level="error")
        self.stats_path = stats_path

    def argv(self) -> list[str]:
        python, _, _, *rest = super().argv()  # [python, -m, wasmproxy, ...]
        return [python, "-c", _CPROFILE_MAIN % str(self.stats_path), *rest]


def summarize_cprofile(stats_path: Path, requests: int, top: int) -> str:
    """Top functions by own time per request, from a cProfile dump of the worker."""
    stats = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    rows = sorted(((tt, nc, f"{Path(file).name}:{func}") for (file, _, func), (_, nc, tt, _, _) in stats.items()),
                  reverse=True)
    total = sum(r[0] for r in rows)
    calls = sum(r[1] for r in rows)
    out = [f"{requests} requests; worker own time {total / requests * 1e6:.0f} us/request (cProfile overhead included),"
           f" {calls / requests:.0f} function calls/request",
           "  us/req  calls/req  function"]
    out += [f"  {tt / requests * 1e6:6.1f}  {nc / requests:9.1f}  {name}" for tt, nc, name in rows[:top]]
    return "\n".join(out)


def run_cprofile(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    with tempfile.TemporaryDirectory(prefix="wasmproxy-profile-") as tmp, nginx_upstream(1) as upstream:
        config, port = proxy_config(scenario, upstream.port, Path(tmp))
        stats_path = Path(tmp) / "worker.pstats"
        with _CProfiledWasmproxy(config, stats_path) as proxy:
            problem = check_once(port, scenario)
            if problem:
                print(f"check failed: {problem}", file=sys.stderr)
                return 1
            requests = parse_wrk(run_wrk(port, scenario, args.connections, args.duration, latency=False))["requests"]
            proxy.stop()  # the worker ends and dumps its stats
        print(f"scenario {scenario.name}, wasmproxy --concurrency 1 under cProfile, wrk -c{args.connections}")
        print(summarize_cprofile(stats_path, (requests or 0) + 1, args.top))  # + the check request
        if args.keep:
            shutil.copyfile(stats_path, args.keep)
    return 0


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
    ap.add_argument("--keep", help="also copy py-spy's collapsed stacks (with --cprofile: the pstats dump) here")
    ap.add_argument("--cprofile", action="store_true", help="cProfile the worker instead of sampling")
    args = ap.parse_args()
    if args.cprofile:
        return run_cprofile(args)
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
