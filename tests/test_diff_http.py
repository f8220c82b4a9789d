"""Differential tests of the HTTP data path: the same config and requests through real Envoy
and through wasmproxy must give the same answers (see tests/support/cases.py for the format).

WASMPROXY_DIFF_REFERENCE_ONLY=1 (or --diff-reference-only) runs every case against Envoy alone,
which checks the cases' own expectations against the reference; WASMPROXY_DIFF_TARGETS picks
targets explicitly (e.g. "wasmproxy", or "envoy,envoy-twin" to compare Envoy with itself).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from support.cases import REFERENCE, Case, CaseFile, DiffEnvironment, RequestSpec, Result, case_params, check_case
from support.ports import free_port
from support.raw_http import RawConnection, build_request
from wasmproxy.demo.upstream import pattern_bytes

pytestmark = pytest.mark.envoy

CASES_DIR = Path(__file__).parent / "diff_cases"
DATA_PATH = CaseFile.load(CASES_DIR / "http_data_path.yaml")
HTTP_OPTIONS = CaseFile.load(CASES_DIR / "http_options.yaml")
FRONT_PROXY = CaseFile.load(CASES_DIR / "front_proxy.yaml")

MIB = 1024 * 1024
LARGE_BODY = 50 * MIB
# What a streaming proxy may grow by while 50 MiB pass through it (it must not buffer them).
RSS_GROWTH_LIMIT_KIB = 16 * 1024


def _environment(case_file: CaseFile, tmp_path_factory: pytest.TempPathFactory,
                 echo_port: int) -> Iterator[DiffEnvironment]:
    with DiffEnvironment(case_file, tmp_path_factory.mktemp(case_file.path.stem), echo_port, free_port()) as env:
        yield env


@pytest.fixture(scope="module")
def data_path_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(DATA_PATH, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def http_options_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(HTTP_OPTIONS, tmp_path_factory, echo_upstream)


@pytest.fixture(scope="module")
def front_proxy_env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: int) -> Iterator[DiffEnvironment]:
    yield from _environment(FRONT_PROXY, tmp_path_factory, echo_upstream)


@pytest.mark.parametrize("case", case_params(DATA_PATH))
def test_data_path(data_path_env: DiffEnvironment, case: Case) -> None:
    data_path_env.run(case)


@pytest.mark.parametrize("case", case_params(HTTP_OPTIONS))
def test_http_options(http_options_env: DiffEnvironment, case: Case) -> None:
    http_options_env.run(case)


@pytest.mark.parametrize("case", case_params(FRONT_PROXY))
def test_envoy_docs_front_proxy_config(front_proxy_env: DiffEnvironment, case: Case) -> None:
    front_proxy_env.run(case)


def _stream_upload(conn: RawConnection, size: int) -> None:
    conn.send(build_request("POST", "/echo/upload", [("content-length", str(size))], None))
    block = pattern_bytes(0, MIB)
    for _ in range(size // MIB):
        conn.send(block)


def test_large_bodies_stream_through_with_flat_rss(data_path_env: DiffEnvironment) -> None:
    """50 MiB up and 50 MiB down on one connection arrive intact, and the proxy does not buffer them."""
    upload_sha = hashlib.sha256(pattern_bytes(0, MIB) * (LARGE_BODY // MIB)).hexdigest()
    download_sha = hashlib.sha256(pattern_bytes(0, LARGE_BODY)).hexdigest()
    results: dict[str, list[Result]] = {}
    for name, target in data_path_env.targets.items():
        with target.connect(timeout=30) as conn:
            # Warm up: let buffers and allocator pools reach their working size first.
            _stream_upload(conn, 4 * MIB)
            assert conn.read_response().status == 200
            before = target.process.rss_kib()

            _stream_upload(conn, LARGE_BODY)
            up = conn.read_response()
            conn.send(build_request("GET", "/echo/download", [("x-echo-body-size", str(LARGE_BODY))]))
            down = conn.read_response()
            after = target.process.rss_kib()

        assert up.status == 200 and up.json()["body_length"] == LARGE_BODY, name
        assert up.json()["body_sha256"] == upload_sha, name
        assert down.status == 200 and len(down.body) == LARGE_BODY, name
        assert down.body_sha256 == download_sha, name
        growth = after - before
        assert growth < RSS_GROWTH_LIMIT_KIB, f"{name}: RSS grew {growth} KiB ({before} -> {after})"
        results[name] = [Result(up, None), Result(down, None)]

    if REFERENCE in results and len(results) > 1:
        case = Case("large_bodies", [RequestSpec("POST", "/echo/upload"), RequestSpec("GET", "/echo/download")])
        check_case(case, results, {n: t.normaliser(case) for n, t in data_path_env.targets.items()})


# --- generated requests -------------------------------------------------------------------------

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Names that change framing or connection handling would turn a generated request into a
# timeout (a promised body never sent) rather than an answer; the cases cover them one by one.
_FRAMING = {"content-length", "transfer-encoding", "connection", "expect", "upgrade", "keep-alive", "te"}
_ROUTES = ["/echo/", "/exact", "/prefix/", "/qp", "/mutate", "/direct", "/hdr", "/old/", "/strip/", "/redirect",
           "/rr/1/", "/sep", "/CI/", "/"]
_PATH_TAIL = ["/", "a", "A", "123", "..", ".", "//", "%2e", "%2F", "?", "&", "=", "v=1", "flag", "#", ";", "~",
              "%", "%zz", "+", " ", "\t", "é"]
_HOSTS = ["diff.test"] * 6 + ["DIFF.test", "example.com", "a.wild.test", "api.x", "ported.test:8080",
                              "diff.test:80", "unknown.test", "", "diff.test.", "[::1]", "a b"]

_methods = st.sampled_from(["GET"] * 4 + ["POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]) \
    | st.text(_TOKEN, min_size=1, max_size=8)
_paths = st.tuples(st.sampled_from(_ROUTES), st.lists(st.sampled_from(_PATH_TAIL), max_size=4)).map(
    lambda p: p[0] + "".join(p[1]))
_header_names = st.text(_TOKEN, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in _FRAMING and not n.lower().startswith("x-echo"))
_header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=24) \
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=8)


@st.composite
def _raw_requests(draw: st.DrawFn) -> bytes:
    headers = [("host", draw(st.sampled_from(_HOSTS))),
               *draw(st.lists(st.tuples(_header_names, _header_values), max_size=5))]
    body = draw(st.none() | st.binary(max_size=64))
    return build_request(draw(_methods), draw(_paths), headers, body, host=None)


# Deterministic examples; no shrinking, so a proxy that hangs costs one timeout, not hundreds
# (the falsifying raw request is printed whole, and it is small by construction).
@settings(max_examples=120, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(raw=_raw_requests())
def test_generated_requests(data_path_env: DiffEnvironment, raw: bytes) -> None:
    """Requests built from a grammar of odd methods, paths, hosts and header bytes: same answers."""
    if len(data_path_env.targets) < 2:
        pytest.skip("needs two targets to compare")
    data_path_env.run(Case("generated", [RequestSpec(raw=raw)]))


def test_pipelined_burst(data_path_env: DiffEnvironment) -> None:
    """Forty requests to the upstream in one write come back in order. (Local replies are not
    mixed in: Envoy's flood protection allows only two queued responses, see the case file.)"""
    kinds = [("/echo/p", [("x-echo-body-size", "3000")]), ("/exact", []), ("/echo/chunked", [("x-echo-chunked", "1")]),
             ("/prefix/x", [("x-echo-status", "404")]), ("/echo/head", [])]
    requests = [RequestSpec(path=f"{path}?n={i}", headers=list(headers), expect={"status": 404 if i % 5 == 3 else 200})
                for i in range(40) for path, headers in [kinds[i % len(kinds)]]]
    data_path_env.run(Case("pipelined_burst", requests, pipeline=True))
