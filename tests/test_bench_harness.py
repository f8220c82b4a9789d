"""bench/harness.py: wrk output parsing and the table's ratios (no load is generated here)."""

from __future__ import annotations

import pytest

from bench.harness import Result, parse_args, parse_wrk, table

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:40000/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.57ms    2.10ms  40.12ms   90.00%
    Req/Sec     3.70k   200.00     4.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    3.90ms
     90%    5.00ms
     99%    1.20s
  7400 requests in 2.00s, 1.20MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   3700.50
Transfer/sec:    600.00KB
"""


def test_parse_wrk_reads_rate_percentiles_in_ms_and_counts_every_error() -> None:
    got = parse_wrk(WRK_OUTPUT)
    assert got == {"requests_per_s": 3700.5, "p50_ms": 0.85, "p99_ms": 1200.0, "requests": 7400, "errors": 10}


def test_parse_wrk_without_latency_section_leaves_percentiles_unknown() -> None:
    got = parse_wrk("  10 requests in 1.00s, 1KB read\nRequests/sec:     10.00\n")
    assert got["p50_ms"] is None and got["p99_ms"] is None and got["errors"] == 0


def test_table_gives_wasmproxy_over_envoy_ratios_per_scenario_and_concurrency() -> None:
    rows = [Result("wasmproxy", "none", 1, 16, 3, 1000.0, 1.0, 8.0),
            Result("envoy", "none", 1, 16, 3, 4000.0, 0.5, 2.0),
            Result("envoy", "none", 2, 16, 3, 9999.0, 0.1, 0.1)]
    lines = table(rows).splitlines()
    assert lines[2].endswith("| 0.250 | 4.0 |")  # req/s 1000/4000, p99 8/2: same concurrency only
    assert lines[3].endswith("| - | - |")


def test_quick_defaults_and_unknown_scenarios() -> None:
    args = parse_args(["--quick"])
    assert args.scenarios == ["none", "headers"] and args.duration == 2
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "none,nope"])
