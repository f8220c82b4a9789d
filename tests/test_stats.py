"""Stats: per-thread stores merged on main; histogram maths and admin formats as Envoy 1.40 prints them.

Expected strings marked "Envoy 1.40" were copied from a real Envoy's admin for the same samples.
"""

from __future__ import annotations

import json
import re
import threading

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wasmproxy.stats import (
    StatsFilter,
    StatsRegistry,
    StatType,
    Store,
    extract_tags,
    prometheus_name,
    render_json,
    render_prometheus,
    render_text,
)
from wasmproxy.stats.histogram import HistogramBins, HistogramStatistics


def stats_of(*values: float) -> HistogramStatistics:
    b = HistogramBins()
    for v in values:
        b.insert(v)
    return HistogramStatistics(b.counts)


# -- histogram maths ------------------------------------------------------------------


def test_quantiles_match_envoy_for_known_bins() -> None:
    # Envoy 1.40: totals=0,0:7, 1,0.1:5, 2,0.1:1 printed P75 1.05, P90 1.0833333333333333, P95 2.05.
    s = stats_of(*[0] * 7, *[1] * 5, 2)
    assert s.computed_quantiles == [0, 0, 0, 1.05, 1.0833333333333333, 2.05, 2.05, 2.05, 2.05, 2.05]
    # Envoy 1.40: 13 samples of 1.
    assert stats_of(*[1] * 13).computed_quantiles == [
        1.0071428571428571, 1.0285714285714285, 1.05, 1.0714285714285714, 1.0857142857142856,
        1.092857142857143, 1.092857142857143, 1.092857142857143, 1.092857142857143, 1.092857142857143,
    ]
    # Envoy 1.40: one sample of 10 ms -> 10.5 everywhere, sum 10.476190476190476275064611400012.
    s = stats_of(10)
    assert s.computed_quantiles == [10.5] * 10
    assert f"{s.sample_sum:.32g}" == "10.476190476190476275064611400012"


def test_bins_two_significant_digits_and_bucket_counts() -> None:
    s = stats_of(*[0] * 9, *[1] * 6, 2)
    # Envoy 1.40 prometheus: le=0.5 -> 9, le=1 -> 15, le=5 -> 16, sum 8.3344947735191645676877669757232.
    assert s.computed_buckets[:3] == [9, 15, 16]
    assert f"{s.sample_sum:.32g}" == "8.3344947735191645676877669757232"
    s = stats_of(1234, 1299, 1300)
    assert s.sample_count == 3
    assert s.computed_quantiles[0] == pytest.approx(1200 + 100 / 3)  # two samples in [1200, 1300)
    assert s.computed_quantiles[-1] == pytest.approx(1350)  # one sample in [1300, 1400)


@given(st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=200))
@example([110])
def test_quantiles_equal_order_statistics_of_evenly_spread_samples(values: list[int]) -> None:
    """Reference model: a bin's n samples sit at left + j/(n+1)*width; quantile q is sample ceil(q*N)."""
    from wasmproxy.stats.histogram import SUPPORTED_QUANTILES, _bin_left_width, bin_key

    by_bin: dict[int, int] = {}
    for v in values:
        by_bin[bin_key(v)] = by_bin.get(bin_key(v), 0) + 1
    positions = []
    for key in sorted(by_bin):
        left, width = _bin_left_width(key)
        n = by_bin[key]
        positions += [left + j / (n + 1) * width for j in range(1, n + 1)]
    expected = [positions[max(1, math.ceil(q * len(values))) - 1] for q in SUPPORTED_QUANTILES]
    s = stats_of(*values)
    assert s.computed_quantiles == pytest.approx(expected)
    assert s.computed_quantiles == sorted(s.computed_quantiles)
    # Each sample's bin contains it: two significant digits. Edges are computed as
    # libcircllhist does (val / 10 * 10**exp), so 110 has the left edge 110.00000000000001.
    for v in values:
        left, width = _bin_left_width(bin_key(v))
        assert left * (1 - 1e-12) <= v < left + width or (v == 0 and left == 0)
    buckets = s.computed_buckets
    assert buckets == sorted(buckets) and buckets[-1] <= s.sample_count == len(values)


def test_empty_histogram_quantiles_are_nan() -> None:
    s = stats_of()
    assert s.sample_count == 0
    assert all(q != q for q in s.computed_quantiles)


# -- per-thread stores and merging ------------------------------------------------------


def test_registry_sums_counters_and_gauges_across_thread_stores() -> None:
    reg = StatsRegistry()
    main = reg.add_store(Store("main_thread"))
    workers = [reg.add_store(Store(f"worker_{i}")) for i in range(4)]

    def work(store: Store) -> None:
        c = store.counter("http.ingress.downstream_rq_total")
        g = store.gauge("http.ingress.downstream_rq_active")
        for _ in range(10_000):
            c.inc()
            g.inc()
            g.dec()
        g.inc(2)

    threads = [threading.Thread(target=work, args=(s,)) for s in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    main.counter("server.live_never_used")
    assert reg.counters()["http.ingress.downstream_rq_total"] == (40_000, True)
    assert reg.gauges()["http.ingress.downstream_rq_active"] == (8, True)
    assert reg.counters()["server.live_never_used"] == (0, False)


def test_removed_store_keeps_counter_totals() -> None:
    reg = StatsRegistry()
    w = reg.add_store(Store("worker_0"))
    w.counter("cluster.c.upstream_rq_total").inc(5)
    w.histogram("cluster.c.upstream_rq_time").record(3)
    reg.remove_store(w)
    assert reg.counters()["cluster.c.upstream_rq_total"] == (5, True)
    reg.flush()
    assert reg.histograms()["cluster.c.upstream_rq_time"].cumulative.sample_count == 1


def test_flush_splits_interval_and_cumulative() -> None:
    reg = StatsRegistry()
    w0, w1 = reg.add_store(Store("worker_0")), reg.add_store(Store("worker_1"))
    w0.histogram("h").record(1)
    w1.histogram("h").record(2)
    reg.flush()
    h = reg.histograms()["h"]
    assert (h.interval.sample_count, h.cumulative.sample_count) == (2, 2)
    w0.histogram("h").record(5)
    reg.flush()
    h = reg.histograms()["h"]
    assert (h.interval.sample_count, h.cumulative.sample_count) == (1, 3)
    reg.flush()
    assert reg.histograms()["h"].interval.sample_count == 0


def test_flush_timer_flushes_on_the_main_dispatcher() -> None:
    from wasmproxy.event import Dispatcher

    reg = StatsRegistry()
    reg.add_store(Store("main_thread")).histogram("h").record(7)
    d = Dispatcher("main_thread")
    flushed = threading.Event()
    real_flush = reg.flush

    def flush() -> None:
        real_flush()
        flushed.set()
        d.exit()

    reg.flush = flush  # type: ignore[method-assign]
    d.post(lambda: reg.start_flush_timer(d, interval_ms=1))
    t = threading.Thread(target=d.run)
    t.start()
    assert flushed.wait(10)
    t.join(10)
    d.close()
    assert reg.histograms()["h"].cumulative.sample_count == 1


# -- admin formats ------------------------------------------------------------------------


@pytest.fixture
def reg() -> StatsRegistry:
    reg = StatsRegistry()
    main = reg.add_store(Store("main_thread"))
    worker = reg.add_store(Store("worker_0"))
    main.gauge("server.live").set(1)
    main.counter("cluster.backend.svc.upstream_cx_total")
    worker.counter("http.admin.downstream_rq_2xx").inc(11)
    main.counter("http.admin.downstream_rq_2xx").inc(3)
    main.counter("listener.127.0.0.1_0.worker_0.downstream_cx_total").inc(20)
    main.counter("wasmcustom.wasm_hits").inc(6)
    h = main.histogram("http.admin.downstream_cx_length_ms")
    for v in [*[0] * 7, *[1] * 5, 2]:
        h.record(v)
    for _ in range(13):
        worker.histogram("listener.admin.connections_accepted_per_socket_event").record(1)
    main.histogram("cluster.backend.svc.upstream_cx_connect_ms")
    reg.flush()
    reg.flush()  # a second flush with no new samples: interval empty (nan), as Envoy a few seconds later
    return reg


def test_text_format_matches_envoy(reg: StatsRegistry) -> None:
    assert render_text(reg, StatsFilter()) == (
        "cluster.backend.svc.upstream_cx_total: 0\n"
        "http.admin.downstream_rq_2xx: 14\n"
        "listener.127.0.0.1_0.worker_0.downstream_cx_total: 20\n"
        "server.live: 1\n"
        "wasmcustom.wasm_hits: 6\n"
        "cluster.backend.svc.upstream_cx_connect_ms: No recorded values\n"
        # Envoy 1.40, same samples:
        "http.admin.downstream_cx_length_ms: P0(nan,0) P25(nan,0) P50(nan,0) P75(nan,1.05) "
        "P90(nan,1.0833333333333333) P95(nan,2.05) P99(nan,2.05) P99.5(nan,2.05) P99.9(nan,2.05) P100(nan,2.05)\n"
        "listener.admin.connections_accepted_per_socket_event: P0(nan,1.0071428571428571) "
        "P25(nan,1.0285714285714285) P50(nan,1.05) P75(nan,1.0714285714285714) P90(nan,1.0857142857142856) "
        "P95(nan,1.092857142857143) P99(nan,1.092857142857143) P99.5(nan,1.092857142857143) "
        "P99.9(nan,1.092857142857143) P100(nan,1.092857142857143)\n"
    )


def test_text_filter_usedonly_and_type(reg: StatsRegistry) -> None:
    f = StatsFilter(used_only=True, regex=re.compile("rq_2xx|upstream"))
    assert render_text(reg, f) == "http.admin.downstream_rq_2xx: 14\n"
    assert render_text(reg, StatsFilter(regex=re.compile("server"), invert=True)).count("server.live") == 0
    only_gauges = render_text(reg, StatsFilter(type=StatType.GAUGES))
    assert only_gauges == "server.live: 1\n"


def test_json_format_matches_envoy(reg: StatsRegistry) -> None:
    # Envoy 1.40: /stats?format=json&filter=server.live
    assert render_json(reg, StatsFilter(regex=re.compile("server.live"))) == (
        '{"stats":[{"name":"server.live","value":1}]}'
    )
    doc = json.loads(render_json(reg, StatsFilter(regex=re.compile("connect_ms|cx_length"))))
    hist = doc["stats"][-1]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    by_name = {h["name"]: h["values"] for h in hist["computed_quantiles"]}
    assert by_name["cluster.backend.svc.upstream_cx_connect_ms"][0] == {"cumulative": None, "interval": None}
    assert by_name["http.admin.downstream_cx_length_ms"][3] == {"cumulative": 1.05, "interval": None}
    raw = render_json(reg, StatsFilter(regex=re.compile("cx_length")))
    assert '{"cumulative":0,"interval":null}' in raw  # integral doubles print as Envoy's 0


def test_prometheus_format_matches_envoy(reg: StatsRegistry) -> None:
    text = render_prometheus(reg, StatsFilter())
    lines = text.splitlines()
    assert "# TYPE envoy_http_downstream_rq_xx counter" in lines
    assert 'envoy_http_downstream_rq_xx{envoy_response_code_class="2",envoy_http_conn_manager_prefix="admin"} 14' in lines
    assert 'envoy_listener_worker_downstream_cx_total{envoy_worker_id="0",envoy_listener_address="127.0.0.1_0"} 20' in lines
    assert 'envoy_cluster_svc_upstream_cx_total{envoy_cluster_name="backend"} 0' in lines
    assert "# TYPE envoy_server_live gauge" in lines and "envoy_server_live{} 1" in lines
    # Wasm plugin metrics: custom namespace stripped, no envoy_ prefix (Envoy 1.40).
    assert "# TYPE wasm_hits counter" in lines and "wasm_hits{} 6" in lines
    # Counters first, then gauges, then histograms; families sorted within each.
    kinds = [line.rsplit(" ", 1)[1] for line in lines if line.startswith("# TYPE")]
    assert kinds == sorted(kinds, key=["counter", "gauge", "histogram"].index)
    h = [line for line in lines if line.startswith("envoy_http_downstream_cx_length_ms")]
    assert h[0] == 'envoy_http_downstream_cx_length_ms_bucket{envoy_http_conn_manager_prefix="admin",le="0.5"} 7'
    assert h[1] == 'envoy_http_downstream_cx_length_ms_bucket{envoy_http_conn_manager_prefix="admin",le="1"} 12'
    assert h[-3] == 'envoy_http_downstream_cx_length_ms_bucket{envoy_http_conn_manager_prefix="admin",le="+Inf"} 13'
    assert h[-1] == 'envoy_http_downstream_cx_length_ms_count{envoy_http_conn_manager_prefix="admin"} 13'
    assert 'le="3600000"' in h[-4]
    assert re.fullmatch(r"envoy_http_downstream_cx_length_ms_sum\{[^}]*\} \d+\.\d+", h[-2])


def test_prometheus_exposition_is_well_formed(reg: StatsRegistry) -> None:
    sample = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*"(?:,|(?=\})))*\} \S+')
    families = set()
    for line in render_prometheus(reg, StatsFilter()).splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in families, f"family {name} declared twice"
            families.add(name)
        else:
            assert sample.fullmatch(line), line


@pytest.mark.parametrize(
    ("name", "metric", "tags"),
    [
        # Envoy 1.40 /stats/prometheus for the same stat names:
        ("cluster.backend.svc.circuit_breakers.default.cx_open", "envoy_cluster_svc_circuit_breakers_default_cx_open",
         (("envoy.cluster_name", "backend"),)),
        ("listener.127.0.0.1_0.http.ingress_http.downstream_rq_5xx", "envoy_listener_http_downstream_rq_xx",
         (("envoy.response_code_class", "5"), ("envoy.http_conn_manager_prefix", "ingress_http"),
          ("envoy.listener_address", "127.0.0.1_0"))),
        ("listener.admin.http.admin.downstream_rq_2xx", "envoy_listener_admin_http_downstream_rq_xx",
         (("envoy.response_code_class", "2"), ("envoy.http_conn_manager_prefix", "admin"))),
        ("listener.admin.main_thread.downstream_cx_total", "envoy_listener_admin_main_thread_downstream_cx_total", ()),
        ("server.worker_0.watchdog_miss", "envoy_server_worker_watchdog_miss", (("envoy.worker_id", "0"),)),
        ("thread_local_cluster_manager.worker_0.clusters_inflated",
         "envoy_thread_local_cluster_manager_worker_clusters_inflated", (("envoy.worker_id", "0"),)),
        ("workers.watchdog_miss", "envoy_workers_watchdog_miss", ()),
        ("wasmcustom.my.dotted_gauge", "my_dotted_gauge", ()),
        ("cluster.x.upstream_rq_200", "envoy_cluster_upstream_rq",
         (("envoy.response_code", "200"), ("envoy.cluster_name", "x"))),
    ],
)
def test_default_tag_extraction(name: str, metric: str, tags: tuple) -> None:
    extracted, got = extract_tags(name)
    assert prometheus_name(extracted) == metric
    assert got == tags


def test_bin_edges_at_float_rounding_limits() -> None:
    from wasmproxy.stats.histogram import _bin_left_width, bin_key

    # log10 rounds down here; the bin must still be the next decade's first (as libcircllhist).
    assert bin_key(0.0009999999999999994) == bin_key(0.001)
    # log10 rounds up here; the value stays in its own decade's last bin.
    v = 9.9999999999999e70
    left, width = _bin_left_width(bin_key(v))
    assert left <= v < left + width


def test_unrepresentable_custom_metric_is_left_out_of_prometheus() -> None:
    reg = StatsRegistry()
    store = reg.add_store(Store())
    store.counter("wasmcustom.9lives").inc()
    store.counter("wasmcustom.ok").inc()
    assert prometheus_name("wasmcustom.9lives") is None
    text = render_prometheus(reg, StatsFilter())
    assert "9lives" not in text and "ok{} 1" in text


@pytest.fixture
def bucket_reg() -> StatsRegistry:
    reg = StatsRegistry()
    store = reg.add_store(Store("main_thread"))
    for v in (0, 1, 2):
        store.histogram("http.admin.downstream_cx_length_ms").record(v)
    store.histogram("server.initialization_time_ms").record(69)
    reg.flush()
    return reg


def test_text_bucket_modes_match_envoy(bucket_reg: StatsRegistry) -> None:
    from wasmproxy.stats import HistogramBuckets

    f = StatsFilter(regex=re.compile("cx_length"))
    # Envoy 1.40, samples 0, 1, 2 in the first flush:
    assert render_text(bucket_reg, f, HistogramBuckets.CUMULATIVE) == (
        "http.admin.downstream_cx_length_ms: B0.5(1,1) B1(2,2) B5(3,3) B10(3,3) B25(3,3) B50(3,3) B100(3,3) "
        "B250(3,3) B500(3,3) B1000(3,3) B2500(3,3) B5000(3,3) B10000(3,3) B30000(3,3) B60000(3,3) "
        "B300000(3,3) B600000(3,3) B1.8e+06(3,3) B3.6e+06(3,3)\n"
    )
    assert render_text(bucket_reg, f, HistogramBuckets.DISJOINT) == (
        "http.admin.downstream_cx_length_ms: B0.5(1,1) B1(1,1) B5(1,1) B10(0,0) B25(0,0) B50(0,0) B100(0,0) "
        "B250(0,0) B500(0,0) B1000(0,0) B2500(0,0) B5000(0,0) B10000(0,0) B30000(0,0) B60000(0,0) "
        "B300000(0,0) B600000(0,0) B1.8e+06(0,0) B3.6e+06(0,0)\n"
    )
    detailed = render_text(bucket_reg, StatsFilter(regex=re.compile("initialization")), HistogramBuckets.DETAILED)
    assert detailed == (
        "server.initialization_time_ms:\n"
        "  totals=69,1:1\n"
        "  intervals=69,1:1\n"
        "  summary=P0(69.5,69.5) P25(69.5,69.5) P50(69.5,69.5) P75(69.5,69.5) P90(69.5,69.5) P95(69.5,69.5) "
        "P99(69.5,69.5) P99.5(69.5,69.5) P99.9(69.5,69.5) P100(69.5,69.5)\n"
    )
    assert "  totals=0,0:1, 1,0.1:1, 2,0.1:1\n" in render_text(bucket_reg, f, HistogramBuckets.DETAILED)


def test_json_bucket_modes_match_envoy(bucket_reg: StatsRegistry) -> None:
    from wasmproxy.stats import HistogramBuckets

    f = StatsFilter(regex=re.compile("initialization"))
    # Envoy 1.40, one sample of 69 ms (note 3e+05: Envoy's shortest double form).
    assert render_json(bucket_reg, f, HistogramBuckets.DISJOINT) == (
        '{"stats":[{"histograms":[{"name":"server.initialization_time_ms","buckets":['
        '{"upper_bound":0.5,"interval":0,"cumulative":0},{"upper_bound":1,"interval":0,"cumulative":0},'
        '{"upper_bound":5,"interval":0,"cumulative":0},{"upper_bound":10,"interval":0,"cumulative":0},'
        '{"upper_bound":25,"interval":0,"cumulative":0},{"upper_bound":50,"interval":0,"cumulative":0},'
        '{"upper_bound":100,"interval":1,"cumulative":1},{"upper_bound":250,"interval":0,"cumulative":0},'
        '{"upper_bound":500,"interval":0,"cumulative":0},{"upper_bound":1000,"interval":0,"cumulative":0},'
        '{"upper_bound":2500,"interval":0,"cumulative":0},{"upper_bound":5000,"interval":0,"cumulative":0},'
        '{"upper_bound":10000,"interval":0,"cumulative":0},{"upper_bound":30000,"interval":0,"cumulative":0},'
        '{"upper_bound":60000,"interval":0,"cumulative":0},{"upper_bound":3e+05,"interval":0,"cumulative":0},'
        '{"upper_bound":6e+05,"interval":0,"cumulative":0},{"upper_bound":1800000,"interval":0,"cumulative":0},'
        '{"upper_bound":3600000,"interval":0,"cumulative":0}]}]}]}'
    )
    assert render_json(bucket_reg, f, HistogramBuckets.DETAILED) == (
        '{"stats":[{"histograms":{"supported_percentiles":[0,25,50,75,90,95,99,99.5,99.9,100],"details":['
        '{"name":"server.initialization_time_ms","totals":[{"lower_bound":69,"width":1,"count":1}],'
        '"intervals":[{"lower_bound":69,"width":1,"count":1}],"percentiles":['
        + ",".join(['{"cumulative":69.5,"interval":69.5}'] * 10) + "]}]}}]}"
    )
    assert render_json(bucket_reg, StatsFilter(regex=re.compile("nothing"))) == '{"stats":[]}'


def test_prometheus_summary_uses_interval_quantiles_like_envoy() -> None:
    reg = StatsRegistry()
    store = reg.add_store(Store("main_thread"))
    h = store.histogram("http.admin.downstream_cx_length_ms")
    for v in (0, 5):
        h.record(v)
    reg.flush()
    for v in [0] * 4 + [1] * 6:
        h.record(v)
    reg.flush()
    text = render_prometheus(reg, StatsFilter(), summary=True)
    labels = 'envoy_http_conn_manager_prefix="admin"'
    # Envoy 1.40, interval of 4 x 0 and 6 x 1 ms:
    assert text == (
        "# TYPE envoy_http_downstream_cx_length_ms summary\n"
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0"}} 0\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.25"}} 0\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.5"}} 1.0142857142857142349612331599928\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.75"}} 1.0571428571428571618895375650027\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.9"}} 1.0714285714285713968507707249955\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.95"}} 1.0857142857142856318120038849884\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.99"}} 1.0857142857142856318120038849884\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.995"}} 1.0857142857142856318120038849884\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="0.999"}} 1.0857142857142856318120038849884\n'
        f'envoy_http_downstream_cx_length_ms{{{labels},quantile="1"}} 1.0857142857142856318120038849884\n'
        f"envoy_http_downstream_cx_length_ms_sum{{{labels}}} 6.2857142857142864755815026001073\n"
        f"envoy_http_downstream_cx_length_ms_count{{{labels}}} 10\n"
    )


def test_histogram_record_truncates_to_integers_like_envoy() -> None:
    reg = StatsRegistry()
    h = reg.add_store(Store()).histogram("http.x.downstream_rq_time")
    for v in (0.7, 1.9, -3):
        h.record(v)
    reg.flush()
    stats = reg.histograms()["http.x.downstream_rq_time"].cumulative
    assert stats.computed_buckets[0] == 2  # 0.7 and -3 land in the zero bin (le=0.5)
    assert stats.computed_quantiles[-1] == pytest.approx(1.05)  # 1.9 is recorded as 1


def test_main_reads_while_workers_create_and_bump_stats() -> None:
    """Lock-free reads: main merges while workers add new names and record (no 'dict changed size')."""
    reg = StatsRegistry()
    stores = [reg.add_store(Store(f"worker_{i}")) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(store: Store) -> None:
        i = 0
        while not stop.is_set() and i < 200_000:  # bounded
            store.counter(f"cluster.c{i % 2000}.upstream_rq_total").inc()
            store.histogram(f"cluster.c{i % 200}.upstream_rq_time").record(i % 300)
            i += 1

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            reg.counters()
            reg.flush()
            render_text(reg, StatsFilter())
    except BaseException as e:  # pragma: no cover - the failure being tested for
        errors.append(e)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    reg.flush()
    total = sum(v for v, _ in reg.counters().values())
    samples = sum(h.cumulative.sample_count for h in reg.histograms().values())
    assert total == samples  # every increment and every sample accounted for after the last flush
