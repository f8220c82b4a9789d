"""RouteAction.hash_policy: which request parts feed the RING_HASH / MAGLEV hash."""

from __future__ import annotations

import asyncio

import uvloop
import yaml
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf.json_format import ParseDict

from test_upstream_support import FakeDispatcher, FakeStream, FakeTls, Upstream, ok_response, static_cluster
from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address
from wasmproxy.router.config import RouteConfig
from wasmproxy.router.hash_policy import HashPolicy, hash64
from wasmproxy.router.router_filter import Router, RouterConfig
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster_manager import ClusterManager


def policy(*items: dict) -> HashPolicy:
    action = ParseDict({"cluster": "c", "hash_policy": list(items)}, route_components_pb2.RouteAction())
    return HashPolicy(action.hash_policy)


def req(**headers: str) -> HeaderMap:
    h = HeaderMap([(":method", "GET"), (":path", headers.pop("path", "/")), (":authority", "a")])
    for k, v in headers.items():
        h.add(k.replace("_", "-"), v)
    return h


REMOTE = Address("10.0.0.9", 4000)


def test_header_cookie_query_and_source_ip() -> None:
    assert policy({"header": {"header_name": "x-user"}}).generate_hash(req(x_user="bob"), REMOTE) == hash64("bob")
    assert policy({"header": {"header_name": "x-user"}}).generate_hash(req(), REMOTE) is None
    assert policy({"cookie": {"name": "sid"}}).generate_hash(req(cookie="a=1; sid=xyz"), REMOTE) == hash64("xyz")
    assert policy({"query_parameter": {"name": "u"}}).generate_hash(req(path="/?u=7"), REMOTE) == hash64("7")
    assert policy({"connection_properties": {"source_ip": True}}).generate_hash(req(), REMOTE) == hash64("10.0.0.9")


def test_header_regex_rewrite() -> None:
    p = policy({"header": {"header_name": "x-user", "regex_rewrite": {"pattern": {"regex": "-.*"}, "substitution": ""}}})
    assert p.generate_hash(req(x_user="bob-123"), REMOTE) == hash64("bob")


def test_policies_combine_and_terminal_stops() -> None:
    a, b = hash64("1"), hash64("2")
    combined = (((a << 1) | (a >> 63)) & ((1 << 64) - 1)) ^ b
    both = policy({"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-b"}})
    assert both.generate_hash(req(x_a="1", x_b="2"), REMOTE) == combined
    terminal = policy({"header": {"header_name": "x-a"}, "terminal": True}, {"header": {"header_name": "x-b"}})
    assert terminal.generate_hash(req(x_a="1", x_b="2"), REMOTE) == a
    assert terminal.generate_hash(req(x_b="2"), REMOTE) == b  # a terminal policy without a value does not stop


def test_router_sends_the_same_key_to_the_same_host() -> None:
    async def scenario() -> None:
        async def answer(reader, writer, head):  # type: ignore[no-untyped-def]
            writer.write(ok_response(b"%d" % writer.get_extra_info("sockname")[1]))
            return True

        ups = [await Upstream(answer).start() for _ in range(2)]
        d = FakeDispatcher(asyncio.get_running_loop())
        cm = ClusterManager([static_cluster("ring", *(u.port for u in ups), extra="lb_policy: RING_HASH")],
                            d, FakeTls(d), Store())
        routes = RouteConfig.from_proto(ParseDict(yaml.safe_load("""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: /}
    route: {cluster: ring, hash_policy: [{header: {header_name: x-user}}]}
"""), route_pb2.RouteConfiguration()))
        config = RouterConfig(None, cm.thread_local)

        async def served_by(user: str) -> bytes:
            h = req(x_user=user)
            s = FakeStream(d, routes.route(h))
            r = Router(config)
            r.set_decoder_filter_callbacks(s)  # type: ignore[arg-type]
            r.decode_headers(h, True)
            await s.done
            r.on_destroy()
            return bytes(s.body)

        users = [f"user{i}" for i in range(12)]
        first = [await served_by(u) for u in users]
        assert [await served_by(u) for u in users] == first
        assert len(set(first)) == 2  # both hosts serve some users
        for u in ups:
            await u.stop()

    uvloop.run(scenario())
