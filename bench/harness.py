"""Load benchmarks, wasmproxy side by side with Envoy 1.40 and nginx direct (the ceiling).

Run through `bench/run` (see bench/README.md). One loopback nginx upstream per concurrency level;
for every system and scenario one proxy process is started, checked with one request, loaded with
wrk (a discarded warm-up run, then a measured `--latency` run), and its RSS read afterwards.
The table goes to stdout, every number also to bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from tests.support.config import bootstrap, render_template, write_yaml  # noqa: E402
from tests.support.ports import LOOPBACK, can_connect, free_port, free_ports  # noqa: E402
from tests.support.processes import (  # noqa: E402
    ENVOY_BIN, EnvoyProcess, ProcessError, ProxyProcess, WasmproxyProcess)
from tests.support.raw_http import RawConnection  # noqa: E402

BENCH = REPO / "bench"
PLUGINS = REPO / "plugins" / "out"
BODY_SIZES = {"1k": 1024, "64k": 64 * 1024}
SYSTEMS = ("wasmproxy", "envoy", "nginx")


@dataclass(frozen=True)
class Scenario:
    """One load shape: an optional Wasm filter, the path wrk asks for, and extra request headers."""

    name: str
    plugin: str | None = None
    configuration: str = ""
    root_id: str = ""
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    expect_header: str | None = None  # a response header proving the filter ran
    expect_body_upper: bool = False

    def filter_entry(self) -> dict[str, Any]:
        """The envoy.filters.http.wasm entry (same YAML for Envoy and wasmproxy)."""
        assert self.plugin is not None
        return {
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": self.name, "root_id": self.root_id,
                    "vm_config": {"vm_id": self.name, "runtime": "envoy.wasm.runtime.v8",
                                  "code": {"local": {"filename": str(PLUGINS / f"{self.plugin}.wasm")}}},
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                      "value": self.configuration},
                },
            },
        }


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("none"),
    Scenario("headers", "headers",
             "request_headers add request_headers x-bench-request 1\n"
             "response_headers add response_headers x-bench-response 1",
             expect_header="x-bench-response"),
    Scenario("as_header", "as_header", "bench", root_id="as_header", expect_header="x-as-header"),
    Scenario("body_1k", "body", "response upper", path="/body/1k", expect_body_upper=True),
    Scenario("body_64k", "body", "response upper", path="/body/64k", expect_body_upper=True),
    Scenario("http_call", "pause", "cluster echo", headers=(("x-pause-request", "http_call"),),
             expect_header="x-resumed-by"),  # nginx echoes it from the request the plugin resumed
)}
QUICK_SCENARIOS = ("none", "headers")


@dataclass
class Result:
    system: str
    scenario: str
    concurrency: int
    connections: int
    duration_s: int
    requests_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    cpu_us_per_request: float | None = None  # the system's own CPU time: robust on a shared machine
    requests: int | None = None
    errors: int = 0  # socket errors plus non-2xx/3xx responses
    note: str = ""
    wrk_output: str = field(default="", repr=False)


# -- wrk -----------------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """req/s, p50/p99 (ms), request and error counts from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    reqs = re.search(r"(\d+) requests in", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_s": float(rps.group(1)) if rps else None,
        "p50_ms": _ms(p50.group(1)) if p50 else None,
        "p99_ms": _ms(p99.group(1)) if p99 else None,
        "requests": int(reqs.group(1)) if reqs else None,
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


def run_wrk(port: int, scenario: Scenario, connections: int, duration_s: int, latency: bool) -> str:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s"]  # whole seconds
    for k, v in scenario.headers:
        argv += ["-H", f"{k}: {v}"]
    if latency:
        argv.append("--latency")
    argv.append(f"http://{LOOPBACK}:{port}{scenario.path}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# -- the upstream ----------------------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (all their threads)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLK_TCK


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@dataclass
class Upstream:
    """A running nginx: its port and master pid (workers are its children)."""

    port: int
    pid: int

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def rss_kib(self) -> int:
        return sum(_rss_kib(p) for p in self.pids())


@contextmanager
def nginx_upstream(workers: int) -> Iterator[Upstream]:
    """nginx from bench/nginx.conf in a temporary prefix, in the foreground; stopped on exit."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="wasmproxy-bench-nginx-") as prefix:
        root = Path(prefix)
        (root / "www" / "body").mkdir(parents=True)
        line = b"the quick brown fox jumps over the lazy dog, 0123456789 bench body\n"
        for name, size in BODY_SIZES.items():
            (root / "www" / "body" / name).write_bytes((line * (size // len(line) + 1))[:size])
        for d in (root, root / "www", root / "www" / "body"):  # nginx workers may run as nobody
            d.chmod(0o755)
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(render_template((BENCH / "nginx.conf").read_text(),
                                        {"workers": workers, "prefix": prefix, "port": port}))
        proc = subprocess.Popen([nginx, "-p", prefix, "-e", "stderr", "-c", str(conf), "-g", "daemon off;"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(root / "stderr.log", "wb"))
        try:
            deadline = time.monotonic() + 10
            while not can_connect(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(root / 'stderr.log').read_text()}")
                time.sleep(0.02)  # polling a child's readiness, not synchronising our own work
            yield Upstream(port, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- systems under test ----------------------------------------------------------------------------

def proxy_config(scenario: Scenario, upstream_port: int, workdir: Path) -> tuple[Path, int]:
    listener, admin = free_ports(2)
    doc = bootstrap(
        listener_port=listener, admin_port=admin,
        virtual_hosts=[{"name": "bench", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}],
        clusters={"upstream": upstream_port, "echo": upstream_port},
        http_filters=[scenario.filter_entry()] if scenario.plugin else [],
    )
    return write_yaml(doc, workdir / f"{scenario.name}-{listener}.yaml"), listener


def check_once(port: int, scenario: Scenario) -> str:
    """One request before loading: '' when it proves the path works, else what is wrong."""
    with RawConnection(LOOPBACK, port, timeout=10) as c:
        r = c.request("GET", scenario.path, list(scenario.headers), host="bench")
    if r.status != 200:
        return f"check request answered {r.status}"
    if scenario.expect_header and r.header(scenario.expect_header) is None:
        return f"no {scenario.expect_header} in the response"
    if scenario.expect_body_upper and (not r.body or r.body != r.body.upper()):
        return "body not rewritten"
    return ""


def measure(system: str, port: int, scenario: Scenario, concurrency: int, args: argparse.Namespace,
            pids: list[int], rss: Any) -> Result:
    result = Result(system, scenario.name, concurrency, args.connections, args.duration)
    problem = check_once(port, scenario)
    if problem:
        result.note = problem
        return result
    if args.warmup > 0:
        run_wrk(port, scenario, args.connections, args.warmup, latency=False)
    cpu_before = cpu_seconds(pids)
    out = run_wrk(port, scenario, args.connections, args.duration, latency=True)
    cpu = cpu_seconds(pids) - cpu_before
    for k, v in parse_wrk(out).items():
        setattr(result, k, v)
    if result.requests:
        result.cpu_us_per_request = round(cpu / result.requests * 1e6, 1)
    result.rss_mib = round(rss() / 1024, 1)
    result.wrk_output = out
    return result


def run_proxy(system: str, scenario: Scenario, upstream: Upstream, concurrency: int,
              args: argparse.Namespace, workdir: Path) -> Result:
    config, port = proxy_config(scenario, upstream.port, workdir)
    cls: type[ProxyProcess] = WasmproxyProcess if system == "wasmproxy" else EnvoyProcess
    proc = cls(config, concurrency=concurrency, log_level="error")
    try:
        proc.start()
        return measure(system, port, scenario, concurrency, args, [proc.pid], proc.rss_kib)
    except ProcessError as e:
        return Result(system, scenario.name, concurrency, args.connections, args.duration,
                      note=str(e).splitlines()[0])
    finally:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)


def run_all(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="wasmproxy-bench-") as tmp:
        for concurrency in args.concurrency:
            with nginx_upstream(concurrency) as upstream:
                for name in args.scenarios:
                    scenario = SCENARIOS[name]
                    for system in args.systems:
                        if system == "nginx":
                            if scenario.plugin:
                                continue  # nginx runs no Proxy-Wasm filters: it is the ceiling
                            r = measure("nginx", upstream.port, scenario, concurrency, args,
                                        upstream.pids(), upstream.rss_kib)
                        else:
                            r = run_proxy(system, scenario, upstream, concurrency, args, Path(tmp))
                        results.append(r)
                        print(f"  {format_row(r)}", file=sys.stderr, flush=True)
    return results


# -- output ----------------------------------------------------------------------------------------

def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_row(r: Result) -> str:
    return (f"{r.scenario:10} {r.concurrency:>2} {r.system:10} {_f(r.requests_per_s, '9.0f')} "
            f"{_f(r.p50_ms, '8.2f')} {_f(r.p99_ms, '8.2f')} {_f(r.rss_mib, '8.1f')} "
            f"{_f(r.cpu_us_per_request, '8.1f')} {r.errors:>6} {r.note}")


def ratio(results: Sequence[Result], r: Result, attr: str) -> float | None:
    """r's value over Envoy's for the same scenario and concurrency."""
    for e in results:
        if e.system == "envoy" and e.scenario == r.scenario and e.concurrency == r.concurrency:
            a, b = getattr(r, attr), getattr(e, attr)
            return a / b if a and b else None
    return None


def table(results: Sequence[Result]) -> str:
    """A Markdown table (it goes into README.md's Performance section as is)."""
    lines = ["| scenario | conc | system | req/s | p50 ms | p99 ms | RSS MiB | CPU us/req | errors "
             "| req/s vs Envoy | p99 vs Envoy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rr = ratio(results, r, "requests_per_s") if r.system == "wasmproxy" else None
        pr = ratio(results, r, "p99_ms") if r.system == "wasmproxy" else None
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.scenario} | {r.concurrency} | {r.system}{note} | {_f(r.requests_per_s, '.0f')} | "
                     f"{_f(r.p50_ms, '.2f')} | {_f(r.p99_ms, '.2f')} | {_f(r.rss_mib, '.1f')} | "
                     f"{_f(r.cpu_us_per_request, '.0f')} | {r.errors} | "
                     f"{_f(rr, '.3f')} | {_f(pr, '.1f')} |")
    return "\n".join(lines)


def write_json(results: Sequence[Result], args: argparse.Namespace, load_before: tuple[float, ...]) -> Path:
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"{stamp}.json"
    doc = {
        "time_utc": stamp,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "uname": " ".join(os.uname())},
        "options": {k: v for k, v in vars(args).items()},
        "envoy_bin": str(ENVOY_BIN),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"only {', '.join(QUICK_SCENARIOS)}, 2 s each, 1 s warm-up")
    p.add_argument("--scenarios", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS),
                   help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="proxy worker counts (default 1,2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--duration", type=int, default=None, help="measured seconds per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="discarded warm-up seconds per run")
    args = p.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = list(QUICK_SCENARIOS if args.quick else SCENARIOS)
    if args.duration is None:
        args.duration = 2 if args.quick else 3
    for name in args.scenarios:
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in args.systems:
        if name not in SYSTEMS:
            p.error(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return args


def check_tools(args: argparse.Namespace) -> list[str]:
    """What is missing, as install hints (bench/run installs nothing itself)."""
    missing = []
    if not shutil.which("wrk"):
        missing.append("wrk (./dev toolchain)")
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        missing.append("nginx (./dev toolchain installs nginx-light)")
    if "envoy" in args.systems and not ENVOY_BIN.exists():
        missing.append(f"{ENVOY_BIN} (./dev setup)")
    for name in args.scenarios:
        plugin = SCENARIOS[name].plugin
        if plugin and not (PLUGINS / f"{plugin}.wasm").exists():
            missing.append(f"plugins/out/{plugin}.wasm (./dev plugins)")
    return sorted(set(missing))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = check_tools(args)
    if missing:
        print("bench/run: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    print(f"{'scenario':10} {'c':>2} {'system':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8} "
          f"{'CPU us/r':>8} {'errors':>6}", file=sys.stderr)
    results = run_all(args)
    path = write_json(results, args, load_before)
    print(table(results))
    print(f"\n{len(results)} runs; wrk -t1 -c{args.connections}, {args.duration:g} s measured after "
          f"{args.warmup:g} s warm-up; load average before {load_before[0]:.2f}; JSON: "
          f"{path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
