"""Route table: virtual-host domain precedence, path/header/query matchers, rewrites, header mutations.

Expected values were checked against Envoy 1.40 (see the router tests for the live comparisons).
"""

from __future__ import annotations

import pytest
import yaml
from envoy.config.route.v3 import route_pb2
from google.protobuf.json_format import ParseDict

from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo
from wasmproxy.router.config import RouteConfig, RouteConfigError


def rc(text: str, **kw: object) -> RouteConfig:
    return RouteConfig.from_proto(ParseDict(yaml.safe_load(text), route_pb2.RouteConfiguration()), **kw)


def req(path: str = "/", host: str = "example.com", method: str = "GET", **headers: str) -> HeaderMap:
    h = HeaderMap([(":method", method), (":path", path), (":authority", host), (":scheme", "http")])
    for k, v in headers.items():
        h.add(k.replace("_", "-"), v)
    return h


def info() -> StreamInfo:
    return StreamInfo(ConnectionInfo(1, Address("127.0.0.1", 10000), Address("10.1.2.3", 5555)))


DOMAINS = """
virtual_hosts:
- {name: exact, domains: ["foo.example.com", "bar.com:8080"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: suffix_long, domains: ["*.example.com"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: suffix_short, domains: ["*.com"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: suffix_dash, domains: ["*-bar.org"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: prefix, domains: ["api.*"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: prefix_longer, domains: ["api.v2.*"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
- {name: default, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: c}}]}
"""


@pytest.mark.parametrize(
    "host, vhost",
    [
        ("foo.example.com", "exact"),
        ("FOO.Example.COM", "exact"),  # host matching is case-insensitive
        ("a.foo.example.com", "suffix_long"),
        ("other.example.com", "suffix_long"),  # longest suffix wins over "*.com"
        ("x.com", "suffix_short"),
        ("example.com", "suffix_short"),  # "*.example.com" needs at least one character before
        ("foo.example.com:80", "default"),  # the port is part of the host unless told otherwise
        ("bar.com:8080", "exact"),
        ("bar.com", "suffix_short"),
        ("baz-bar.org", "suffix_dash"),
        ("-bar.org", "default"),  # a wildcard never matches the empty string
        ("api.example.net", "prefix"),
        ("api.com", "suffix_short"),  # suffix wildcards beat prefix wildcards
        ("api.v2.net", "prefix_longer"),
        ("unknown.net", "default"),
    ],
)
def test_virtual_host_domain_precedence(host: str, vhost: str) -> None:
    table = rc(DOMAINS)
    found = table.virtual_host(req(host=host))
    assert found is not None and found.name == vhost


def test_ignore_port_in_host_matching() -> None:
    table = rc(DOMAINS + "ignore_port_in_host_matching: true\n")
    assert table.virtual_host(req(host="foo.example.com:80")).name == "exact"


def test_no_default_vhost_gives_no_route() -> None:
    table = rc("virtual_hosts: [{name: a, domains: [a.com], routes: [{match: {prefix: /}, route: {cluster: c}}]}]")
    assert table.route(req(host="b.com")) is None
    assert table.route(req(host="a.com")) is not None


@pytest.mark.parametrize(
    "text",
    [
        "virtual_hosts: [{name: a, domains: ['*']}, {name: b, domains: ['*']}]",
        "virtual_hosts: [{name: a, domains: [x.com]}, {name: b, domains: [X.com]}]",
        "virtual_hosts: [{name: a, domains: ['*.x.com', '*.x.com']}]",
    ],
)
def test_duplicate_domains_are_rejected(text: str) -> None:
    with pytest.raises(RouteConfigError):
        rc(text)


def routes(*entries: str) -> RouteConfig:
    body = "\n".join(f"  - {e}" for e in entries)
    return rc(f"virtual_hosts:\n- name: v\n  domains: ['*']\n  routes:\n{body}\n")


def matched(table: RouteConfig, headers: HeaderMap, stream_id: int = 0) -> str | None:
    r = table.route(headers, stream_id)
    return r.name if r is not None else None


@pytest.mark.parametrize(
    "path, name",
    [
        ("/exact", "path"),
        ("/exact?q=1", "path"),  # the query is not part of the path
        ("/exact/", "prefix_exact"),
        ("/api", "sep"),
        ("/api/x", "sep"),
        ("/apix", "prefix_api"),
        ("/re/123", "regex"),
        ("/re/123/x", "catchall"),  # safe_regex is a full match
        ("/RE/123", "catchall"),
        ("/CI/thing", "ci"),
        ("/other", "catchall"),
    ],
)
def test_path_matchers(path: str, name: str) -> None:
    table = routes(
        "{name: path, match: {path: /exact}, route: {cluster: c}}",
        "{name: sep, match: {path_separated_prefix: /api}, route: {cluster: c}}",
        "{name: regex, match: {safe_regex: {regex: '/re/[0-9]+'}}, route: {cluster: c}}",
        "{name: ci, match: {prefix: /ci/, case_sensitive: false}, route: {cluster: c}}",
        "{name: prefix_api, match: {prefix: /ap}, route: {cluster: c}}",
        "{name: prefix_exact, match: {prefix: /exact/}, route: {cluster: c}}",
        "{name: catchall, match: {prefix: /}, route: {cluster: c}}",
    )
    assert matched(table, req(path)) == name


def test_path_separated_prefix_rejects_trailing_slash() -> None:
    with pytest.raises(RouteConfigError):
        routes("{match: {path_separated_prefix: /api/}, route: {cluster: c}}")


HEADER_ROUTES = routes(
    "{name: exact, match: {prefix: /, headers: [{name: x-a, string_match: {exact: one}}]}, route: {cluster: c}}",
    "{name: legacy_exact, match: {prefix: /, headers: [{name: x-l, exact_match: v}]}, route: {cluster: c}}",
    "{name: prefix, match: {prefix: /, headers: [{name: x-b, prefix_match: pre}]}, route: {cluster: c}}",
    "{name: suffix, match: {prefix: /, headers: [{name: x-c, suffix_match: suf}]}, route: {cluster: c}}",
    "{name: contains, match: {prefix: /, headers: [{name: x-d, contains_match: mid}]}, route: {cluster: c}}",
    "{name: regex, match: {prefix: /, headers: [{name: x-e, safe_regex_match: {regex: 'v[0-9]'}}]}, route: {cluster: c}}",
    "{name: present, match: {prefix: /, headers: [{name: x-f, present_match: true}]}, route: {cluster: c}}",
    "{name: absent, match: {prefix: /, headers: [{name: x-g, present_match: false}, {name: x-absent-test, present_match: true}]}, route: {cluster: c}}",
    "{name: inverted, match: {prefix: /, headers: [{name: x-h, string_match: {exact: 'no'}, invert_match: true}, {name: x-inv, present_match: true}]}, route: {cluster: c}}",
    "{name: ignore_case, match: {prefix: /, headers: [{name: x-i, string_match: {exact: ABC, ignore_case: true}}]}, route: {cluster: c}}",
    "{name: range, match: {prefix: /, headers: [{name: x-r, range_match: {start: 10, end: 20}}]}, route: {cluster: c}}",
    "{name: missing_empty, match: {prefix: /, headers: [{name: x-m, string_match: {exact: ''}, treat_missing_header_as_empty: true}, {name: x-me, present_match: true}]}, route: {cluster: c}}",
    "{name: fallback, match: {prefix: /}, route: {cluster: c}}",
)


@pytest.mark.parametrize(
    "headers, name",
    [
        ({"x-a": "one"}, "exact"),
        ({"x-a": "One"}, "fallback"),
        ({"x-l": "v"}, "legacy_exact"),
        ({"x-b": "prefix"}, "prefix"),
        ({"x-c": "a-suf"}, "suffix"),
        ({"x-d": "amidb"}, "contains"),
        ({"x-e": "v1"}, "regex"),
        ({"x-e": "v12"}, "fallback"),  # full match
        ({"x-f": ""}, "present"),
        ({"x-absent-test": "1"}, "absent"),
        ({"x-absent-test": "1", "x-g": "1"}, "fallback"),
        ({"x-inv": "1", "x-h": "yes"}, "inverted"),
        ({"x-inv": "1", "x-h": "no"}, "fallback"),
        ({"x-inv": "1"}, "fallback"),  # an absent header fails an inverted value match
        ({"x-i": "abc"}, "ignore_case"),
        ({"x-r": "15"}, "range"),
        ({"x-r": "20"}, "fallback"),
        ({"x-r": "x"}, "fallback"),
        ({"x-me": "1"}, "missing_empty"),
    ],
)
def test_header_matchers(headers: dict[str, str], name: str) -> None:
    h = req("/")
    for k, v in headers.items():
        h.add(k, v)
    assert matched(HEADER_ROUTES, h) == name


def test_repeated_header_is_matched_joined_with_commas() -> None:
    table = routes(
        "{name: joined, match: {prefix: /, headers: [{name: x-a, string_match: {exact: 'a,b'}}]}, route: {cluster: c}}",
        "{name: other, match: {prefix: /}, route: {cluster: c}}",
    )
    h = req("/")
    h.add("x-a", "a")
    h.add("x-a", "b")
    assert matched(table, h) == "joined"


@pytest.mark.parametrize(
    "path, name",
    [
        ("/?debug=1", "exact"),
        ("/?debug=%31", "exact"),  # values are percent-decoded
        ("/?debug=2", "present"),
        ("/?debug", "present"),
        ("/?x=1&debug=1&debug=2", "exact"),  # the first value counts
        ("/?debugx=1", "fallback"),
    ],
)
def test_query_parameter_matchers(path: str, name: str) -> None:
    table = routes(
        "{name: exact, match: {prefix: /, query_parameters: [{name: debug, string_match: {exact: '1'}}]}, route: {cluster: c}}",
        "{name: present, match: {prefix: /, query_parameters: [{name: debug, present_match: true}]}, route: {cluster: c}}",
        "{name: fallback, match: {prefix: /}, route: {cluster: c}}",
    )
    assert matched(table, req(path)) == name


def test_grpc_and_runtime_fraction_matchers() -> None:
    table = routes(
        "{name: grpc, match: {prefix: /, grpc: {}}, route: {cluster: c}}",
        "{name: half, match: {prefix: /, runtime_fraction: {default_value: {numerator: 50}}}, route: {cluster: c}}",
        "{name: rest, match: {prefix: /}, route: {cluster: c}}",
    )
    assert matched(table, req("/", content_type="application/grpc+proto")) == "grpc"
    assert matched(table, req("/"), stream_id=149) == "half"  # 149 % 100 < 50
    assert matched(table, req("/"), stream_id=150) == "rest"
    assert matched(table, req("/"), stream_id=175) == "rest"


def test_route_action_defaults_and_cluster_specifiers() -> None:
    table = routes(
        "{name: h, match: {prefix: /h}, route: {cluster_header: x-cluster}}",
        "{name: w, match: {prefix: /w}, route: {weighted_clusters: {clusters: [{name: a, weight: 1}, {name: b, weight: 3}]}}}",
        "{name: t, match: {prefix: /t}, route: {cluster: c, timeout: 0.25s, idle_timeout: 2s}}",
        "{name: d, match: {prefix: /}, route: {cluster: c}}",
    )
    d = table.route(req("/"))
    assert d.cluster_for(req("/"), 0) == "c" and d.timeout_ms == 15000 and d.idle_timeout_ms is None
    t = table.route(req("/t"))
    assert (t.timeout_ms, t.idle_timeout_ms) == (250, 2000)
    assert table.route(req("/h")).cluster_for(req("/h", x_cluster="zz"), 0) == "zz"
    w = table.route(req("/w"))
    assert [w.cluster_for(req("/w"), i) for i in range(4)] == ["a", "b", "b", "b"]


def test_validate_clusters() -> None:
    text = "virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: nope}}]}]"
    with pytest.raises(RouteConfigError, match="unknown cluster 'nope'"):
        rc(text, cluster_exists=lambda n: False)
    rc(text + "\nvalidate_clusters: false", cluster_exists=lambda n: False)


@pytest.mark.parametrize(
    "route, path, new_path",
    [
        ("{match: {prefix: /rw/}, route: {cluster: c, prefix_rewrite: /x/}}", "/rw/abc?q=1", "/x/abc?q=1"),
        ("{match: {prefix: /RW/, case_sensitive: false}, route: {cluster: c, prefix_rewrite: /}}", "/rw/abc", "/abc"),
        ("{match: {path: /a}, route: {cluster: c, prefix_rewrite: /b}}", "/a?z", "/b?z"),
        ("{match: {prefix: /}, route: {cluster: c, regex_rewrite: {pattern: {regex: '^/v([0-9])/(.*)$'}, substitution: '/\\2/v\\1'}}}",
         "/v1/items?x=y", "/items/v1?x=y"),
        ("{match: {prefix: /}, route: {cluster: c, regex_rewrite: {pattern: {regex: 'o'}, substitution: '0'}}}",
         "/foo/boo", "/f00/b00"),
    ],
)
def test_path_rewrites_keep_query_and_record_original(route: str, path: str, new_path: str) -> None:
    table = routes(route)
    h = req(path)
    table.route(h).finalize_request_headers(h, info())
    assert h.get(":path") == new_path
    assert h.get("x-envoy-original-path") == path


def test_host_rewrite_literal_records_original_host() -> None:
    table = routes("{match: {prefix: /}, route: {cluster: c, host_rewrite_literal: foo.com}}")
    h = req("/", host="127.0.0.1:18080")
    table.route(h).finalize_request_headers(h, info())
    assert h.get(":authority") == "foo.com"
    assert h.get("x-envoy-original-host") == "127.0.0.1:18080"
    h2 = req("/", host="a")
    table.route(h2).finalize_request_headers(h2, info(), keep_original_host_or_path=False)
    assert "x-envoy-original-host" not in h2


MUTATIONS = """
request_headers_to_add:
- header: {key: x-rc, value: "rc-%DOWNSTREAM_REMOTE_ADDRESS%"}
- header: {key: x-order, value: rc}
response_headers_to_add:
- header: {key: x-rc-resp, value: rc}
virtual_hosts:
- name: vh
  domains: ["*"]
  request_headers_to_add:
  - header: {key: x-vh, value: vh}
  - header: {key: x-order, value: vh}
  response_headers_to_add:
  - header: {key: x-vh-resp, value: vh}
  routes:
  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_remove: [x-remove-me]
    request_headers_to_add:
    - header: {key: x-order, value: route}
    - header: {key: x-over, value: r}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-absent, value: a}
      append_action: ADD_IF_ABSENT
    - header: {key: x-only-if, value: o}
      append_action: OVERWRITE_IF_EXISTS
    - header: {key: x-empty, value: "%UPSTREAM_METADATA([\\"m\\", \\"k\\"])%"}
    - header: {key: x-keep-empty, value: ""}
      keep_empty_value: true
    - header: {key: x-pct, value: "100%% %DOWNSTREAM_LOCAL_PORT% %REQ(x-client)%"}
    - header: {key: x-legacy, value: l}
      append: false
    response_headers_to_add:
    - header: {key: x-route-resp, value: r}
    response_headers_to_remove: [x-secret]
"""


def test_request_header_mutations_follow_envoy_order() -> None:
    # Order and placement as Envoy 1.40 sent them upstream for the same config.
    table = rc(MUTATIONS)
    h = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h"),
                   ("x-remove-me", "1"), ("x-over", "client"), ("x-order", "client"), ("x-client", "cv"),
                   ("x-legacy", "old")])
    table.route(h).finalize_request_headers(h, info())
    assert [(k, v) for k, v in h.items() if not k.startswith(":")] == [
        ("x-order", "client"),
        ("x-client", "cv"),
        ("x-over", "r"),  # overwrite = remove + append, before this level's appends
        ("x-legacy", "l"),  # append: false is OVERWRITE_IF_EXISTS_OR_ADD
        ("x-order", "route"),
        ("x-absent", "a"),
        ("x-keep-empty", ""),
        ("x-pct", "100% 10000 cv"),
        ("x-vh", "vh"),
        ("x-order", "vh"),
        ("x-rc", "rc-10.1.2.3:5555"),
        ("x-order", "rc"),
    ]


def test_most_specific_header_mutations_wins_flips_the_order() -> None:
    table = rc(MUTATIONS + "most_specific_header_mutations_wins: true\n")
    h = req("/")
    table.route(h).finalize_request_headers(h, info())
    assert h.get_all("x-order") == ["rc", "vh", "route"]


def test_response_header_mutations() -> None:
    table = rc(MUTATIONS)
    resp = HeaderMap([(":status", "200"), ("x-secret", "s"), ("content-length", "0")])
    table.route(req("/")).finalize_response_headers(resp, info())
    assert resp.items() == [(":status", "200"), ("content-length", "0"), ("x-route-resp", "r"),
                            ("x-vh-resp", "vh"), ("x-rc-resp", "rc")]


def test_pseudo_and_host_headers_cannot_be_added() -> None:
    with pytest.raises(RouteConfigError):
        rc("request_headers_to_add: [{header: {key: ':path', value: x}}]\nvirtual_hosts: []")
    with pytest.raises(RouteConfigError):
        rc("request_headers_to_add: [{header: {key: Host, value: x}}]\nvirtual_hosts: []")


def test_direct_response_and_redirect_actions(tmp_path) -> None:
    body_file = tmp_path / "body.txt"
    body_file.write_bytes(b"from file")
    table = routes(
        "{name: s, match: {prefix: /s}, direct_response: {status: 202, body: {inline_string: hello}}}",
        "{name: b, match: {prefix: /b}, direct_response: {status: 200, body: {inline_bytes: AAE=}}}",
        f"{{name: f, match: {{prefix: /f}}, direct_response: {{status: 200, body: {{filename: '{body_file}'}}}}}}",
        "{name: e, match: {prefix: /e}, direct_response: {status: 204}}",
        "{name: r1, match: {prefix: /r1}, redirect: {path_redirect: /new}}",
        "{name: r2, match: {prefix: /r2}, redirect: {https_redirect: true, response_code: PERMANENT_REDIRECT}}",
        "{name: r3, match: {prefix: /r3/}, redirect: {prefix_rewrite: /x/, host_redirect: h.com, port_redirect: 81, strip_query: true}}",
        "{name: r4, match: {prefix: /r4}, redirect: {scheme_redirect: https, path_redirect: '/p?a=b'}}",
    )
    s = table.route(req("/s"))
    assert (s.action, s.direct_status, s.direct_body) == ("direct_response", 202, b"hello")
    assert table.route(req("/b")).direct_body == b"\x00\x01"
    assert table.route(req("/f")).direct_body == b"from file"
    assert table.route(req("/e")).direct_body == b""
    h = req("/r1/x?a=1", host="127.0.0.1:18080", x_forwarded_proto="http")
    r1 = table.route(h)
    assert (r1.redirect_code, r1.redirect_location(h)) == (301, "http://127.0.0.1:18080/new?a=1")
    h = req("/r2/y?q", host="site.com:80")
    r2 = table.route(h)
    assert (r2.redirect_code, r2.redirect_location(h)) == (308, "https://site.com/r2/y?q")
    h = req("/r3/y?q", host="site.com:8000")
    assert table.route(h).redirect_location(h) == "http://h.com:81/x/y"
    h = req("/r4", host="site.com")
    assert table.route(h).redirect_location(h) == "https://site.com/p?a=b"


def test_direct_response_status_range_is_validated() -> None:
    with pytest.raises(RouteConfigError):
        routes("{match: {prefix: /}, direct_response: {status: 99}}")


def test_route_name_metadata_and_per_filter_config() -> None:
    table = rc("""
virtual_hosts:
- name: v
  domains: ["*"]
  typed_per_filter_config:
    f1: {"@type": type.googleapis.com/google.protobuf.StringValue, value: vh}
  routes:
  - name: the_route
    match: {prefix: /}
    route: {cluster: c}
    metadata: {filter_metadata: {ns: {k: v}}}
    typed_per_filter_config:
      f2: {"@type": type.googleapis.com/google.protobuf.StringValue, value: route}
""")
    r = table.route(req("/"))
    assert r.name == "the_route" and r.metadata == {"ns": {"k": "v"}}
    assert r.per_filter_config("f1").type_url.endswith("StringValue")
    assert r.per_filter_config("f2") is not None and r.per_filter_config("f3") is None


def test_bad_regex_is_a_config_error() -> None:
    with pytest.raises(RouteConfigError):
        routes("{match: {safe_regex: {regex: '('}}, route: {cluster: c}}")


def test_shadow_authority_goes_before_the_port() -> None:
    from wasmproxy.router.config import shadow_authority

    assert shadow_authority("127.0.0.1:19480") == "127.0.0.1-shadow:19480"  # as Envoy 1.40 sent it
    assert shadow_authority("svc.local") == "svc.local-shadow"
    assert shadow_authority("[::1]:80") == "[::1]-shadow:80"


def test_host_rewrite_from_header_and_path_regex() -> None:
    table = routes(
        "{match: {prefix: /h}, route: {cluster: c, host_rewrite_header: x-host}}",
        "{match: {prefix: /p/}, route: {cluster: c, host_rewrite_path_regex: {pattern: {regex: '^/p/([^/]+)/.*$'}, substitution: '\\1.svc'}}}",
    )
    h = req("/h", x_host="from-header")
    table.route(h).finalize_request_headers(h, info())
    assert h.get(":authority") == "from-header"
    h = req("/p/orders/list?x=1")
    table.route(h).finalize_request_headers(h, info())
    assert h.get(":authority") == "orders.svc"


def test_tls_context_matcher_on_a_plaintext_listener() -> None:
    table = routes(
        "{name: cert, match: {prefix: /, tls_context: {presented: true}}, route: {cluster: c}}",
        "{name: nocert, match: {prefix: /, tls_context: {presented: false}}, route: {cluster: c}}",
    )
    assert matched(table, req("/")) == "nocert"
    with pytest.raises(RouteConfigError):
        routes("{match: {prefix: /, dynamic_metadata: [{filter: f, path: [{key: k}], value: {present_match: true}}]}, route: {cluster: c}}")


def test_require_tls_redirects_plaintext_requests() -> None:
    # Envoy 1.40: "Host: tls.test:8443", GET /a/b?c=1 -> 301, location https://tls.test:8443/a/b?c=1,
    # with none of the virtual host's or config's response headers.
    table = rc("""
response_headers_to_add: [{header: {key: x-rc, value: "1"}}]
virtual_hosts:
- name: all
  domains: ["tls.test:8443"]
  require_tls: ALL
  response_headers_to_add: [{header: {key: x-vh, value: "1"}}]
  routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]
- name: external
  domains: ["ext.test"]
  require_tls: EXTERNAL_ONLY
  routes: [{name: e, match: {prefix: /}, route: {cluster: c}}]
""")
    h = req("/a/b?c=1", host="tls.test:8443", x_forwarded_proto="http")
    r = table.route(h)
    assert (r.action, r.redirect_code, r.redirect_location(h)) == ("redirect", 301, "https://tls.test:8443/a/b?c=1")
    resp = HeaderMap([(":status", "301")])
    r.finalize_response_headers(resp, info())
    assert resp.items() == [(":status", "301")]
    assert table.route(req("/", host="tls.test:8443", x_forwarded_proto="https")).name == "r"
    assert table.route(req("/", host="ext.test", x_forwarded_proto="http")).action == "redirect"
    assert table.route(req("/", host="ext.test", x_forwarded_proto="http", x_envoy_internal="true")).name == "e"


def test_virtual_host_mirror_policies_apply_unless_the_route_has_its_own() -> None:
    table = rc("""
virtual_hosts:
- name: v
  domains: ["*"]
  request_mirror_policies: [{cluster: vh-mirror}]
  routes:
  - {name: own, match: {prefix: /own}, route: {cluster: c, request_mirror_policies: [{cluster: route-mirror}]}}
  - {name: inherit, match: {prefix: /}, route: {cluster: c}}
""")
    assert [m[0] for m in table.route(req("/own")).mirror_policies] == ["route-mirror"]
    assert [m[0] for m in table.route(req("/x")).mirror_policies] == ["vh-mirror"]


def test_time_and_duration_formatters() -> None:
    from wasmproxy.router.header_parser import format_time

    assert format_time(1795767715.795, "%Y-%m-%dT%H:%M:%E3SZ") == "2026-11-27T08:21:55.795Z"  # START_TIME's default
    assert format_time(1795767715.795, "%s|%3f|%Y") == "1795767715|795|2026"
    table = rc("""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_add:
    - header: {key: x-year, value: "%START_TIME(%Y)%"}
    - header: {key: x-duration, value: "%DURATION%"}
""")
    h = req("/")
    i = info()
    i.start_time = 1795767715.0
    table.route(h).finalize_request_headers(h, i)
    assert h.get("x-year") == "2026" and h.get("x-duration").isdigit()


def test_req_and_resp_formatters_in_response_headers() -> None:
    table = rc("""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: /}
    route: {cluster: c}
    response_headers_to_add:
    - header: {key: x-echo-ua, value: "%REQ(user-agent)%"}
    - header: {key: x-copy, value: "len=%RESP(content-length)%"}
""")
    request = req("/", user_agent="curl")
    resp = HeaderMap([(":status", "200"), ("content-length", "5")])
    table.route(request).finalize_response_headers(resp, info(), request)
    assert resp.get("x-echo-ua") == "curl" and resp.get("x-copy") == "len=5"


MEMO_TABLE = """
virtual_hosts:
- name: secure
  domains: ["secure.example.com"]
  require_tls: EXTERNAL_ONLY
  routes: [{name: s, match: {prefix: /}, route: {cluster: c}}]
- name: exact
  domains: ["foo.example.com"]
  routes:
  - {name: grpc, match: {prefix: /api, grpc: {}}, route: {cluster: c}}
  - {name: api, match: {prefix: /api, query_parameters: [{name: v, string_match: {exact: "2"}}]}, route: {cluster: c}}
  - {name: lower, match: {path: /x, case_sensitive: false}, route: {cluster: c}}
- name: default
  domains: ["*"]
  routes: [{name: d, match: {prefix: /d}, route: {cluster: c}}]
"""


def test_route_memo_answers_as_matching_does() -> None:
    # The memo keys on the first values of what the table reads (:path, the host, the TLS
    # headers, content-type): every request gets what a fresh match gives, in any order.
    table = rc(MEMO_TABLE)
    assert table._memo_keys == (":path", ":authority", "x-forwarded-proto", "x-envoy-internal", "content-type")
    requests = [
        req("/api", host="foo.example.com"), req("/api?v=2", host="foo.example.com"),
        req("/api", host="foo.example.com", content_type="application/grpc"), req("/X", host="foo.example.com"),
        req("/d", host="secure.example.com"), req("/d", host="secure.example.com", x_forwarded_proto="https"),
        req("/d", host="secure.example.com", x_envoy_internal="true"), req("/d"), req("/e"),
        req("/api", host="FOO.example.com", content_type="text/plain"),
    ]
    for _ in range(2):
        for h in requests + requests[::-1]:
            assert table.route(h) is table._route(h, 0)
    h = req("/d")
    h.remove(":path")
    assert table.route(h) is None


def test_route_memo_is_off_for_tables_that_read_more_than_first_values() -> None:
    assert rc(MEMO_TABLE.replace("grpc: {}", "headers: [{name: x, present_match: true}]"))._memo_keys is None
    assert rc(MEMO_TABLE.replace("grpc: {}", "runtime_fraction: {default_value: {numerator: 50}}"))._memo_keys is None
    assert rc("virtual_hosts: [{name: d, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: c}}]}]")._memo_keys == (":path",)
