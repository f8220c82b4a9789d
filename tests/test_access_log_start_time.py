"""%START_TIME% (default format) is formatted once per second: each line still shows its own time."""

from __future__ import annotations

import calendar

from wasmproxy.http.access_log import Formatter
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo


def line_at(formatter: Formatter, start_time: float) -> str:
    si = StreamInfo(ConnectionInfo(3, Address("127.0.0.1", 10000), Address("10.0.0.7", 40000)),
                    start_time=start_time, start_monotonic=100.0)
    return formatter.format((None, None, None, si))


def test_start_time_lines_within_and_across_seconds() -> None:
    f = Formatter("%START_TIME%")
    base = calendar.timegm((2026, 11, 27, 7, 34, 38))
    assert line_at(f, base + 0.726) == "2026-11-27T07:34:38.726Z"
    assert line_at(f, base + 0.001) == "2026-11-27T07:34:38.001Z"  # same second, cached text
    assert line_at(f, base + 1.5) == "2026-11-27T07:34:39.500Z"  # the next second
    assert line_at(f, base + 86400) == "2026-11-28T07:34:38.000Z"
    assert line_at(f, base + 0.2) == "2026-11-27T07:34:38.200Z"  # back to an earlier second


def test_values_that_are_not_text_and_max_lengths() -> None:
    si = StreamInfo(ConnectionInfo(3, Address("127.0.0.1", 10000), Address("10.0.0.7", 40000)),
                    start_time=0.0, start_monotonic=100.0)
    si.response_code = 503
    si.route_name = "a-long-route-name"
    assert Formatter("%RESPONSE_CODE%|%RESPONSE_CODE:2%|%ROUTE_NAME:6%|%UPSTREAM_CLUSTER%|100%%").format(
        (None, None, None, si)) == "503|50|a-long|-|100%"
    assert Formatter("[%UPSTREAM_CLUSTER%]", omit_empty_values=True).format((None, None, None, si)) == "[]"
