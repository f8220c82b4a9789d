"""Differential cases: one config, many request sequences, run through Envoy and wasmproxy.

A case file (YAML, under tests/diff_cases/) holds::

    config:                      # either a standard bootstrap (support.config.bootstrap kwargs) ...
      bootstrap: {virtual_hosts: [...], clusters: {echo: "${echo_port}"}, http_filters: [...]}
      # ... or a full Envoy YAML with ${placeholders}, relative to the case file:
      # template: front-proxy.yaml
      ports: [extra_port]        # more per-target free ports for the template (optional)
    cases:
      - name: prefix_match
        pipeline: false          # true: send every request in one write, then read the answers
        ignore_headers: []       # response headers not compared (per case)
        ignore_echo_headers: []  # request headers, as the echo upstream saw them, not compared
        ignore_fields: []        # whole top-level fields not compared: status, headers, body...
        ordered_headers: false   # true: header order is compared too
        xfail: "why"             # a known, explained wasmproxy difference (strict; only when it runs)
        requests:
          - method: GET          # or raw: "GET / HTTP/1.1\\r\\n..." (exact bytes, latin-1)
            path: /prefix/x
            headers: [[x-a, "1"]] # or a mapping; host defaults to "diff.test"
            pad_headers: {count: 1, size: 70000}  # add `count` headers x-pad-<i> of `size` bytes
            body: "text"          # or body_size: N (the echo upstream's pattern), chunked: true
            expect_continue: true # send the headers, wait for the interim 100, then the body
            new_connection: true  # default: reuse the case's connection while it stays open
            check_closed: true    # record whether the proxy then closes the connection
            write_size: 1         # send the request in writes of this many bytes
            expect: {status: 200, closed: false, headers: {x-a: "1", x-b: null}, interim: [100],
                     body: "exact", body_contains: "...", outcome: response,  # or truncated, closed
                     echo: {path: /x, body_length: 3, headers: {host: example.com}}}

Placeholders: ${listener_port} ${admin_port} (per target), ${echo_port} ${closed_port} (shared),
${repo} (the checkout, e.g. for plugin paths), ${cases_dir} (the case file's directory) and any
extra names under `ports`. Every request's `expect` is checked against every target; then each
normalised outcome of every other target must equal Envoy's (when Envoy runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from wasmproxy.demo.upstream import pattern_bytes

from .compare import first_difference, format_difference
from .config import bootstrap, render_template, substitute, write_yaml
from .normalize import Normaliser, Outcome
from .ports import LOOPBACK, free_ports
from .processes import REPO, EnvoyProcess, ProcessError, ProxyProcess, WasmproxyProcess
from .raw_http import Headers, PeerClosed, RawConnection, Response, build_request

REFERENCE = "envoy"
CANDIDATE = "wasmproxy"
# "envoy-twin" is a second Envoy as the candidate: Envoy against itself must show no difference,
# which checks that normalisation hides every volatile value and nothing else is racy.
TWIN = "envoy-twin"
PROCESS_CLASSES: dict[str, type[ProxyProcess]] = {REFERENCE: EnvoyProcess, CANDIDATE: WasmproxyProcess,
                                                  TWIN: EnvoyProcess}
# Envoy closes after a local error reply once its delayed_close_timeout (1 s by default) ends.
CLOSE_CHECK_S = 3.0
# Every request of a case must be answered within this (the slowest case waits 0.5 s on purpose).
REQUEST_TIMEOUT_S = 5.0
# Free ports are chosen, then bound by the proxy; on a shared machine another process may win.
BIND_ATTEMPTS = 3


def selected_targets() -> list[str]:
    """Targets to run: both by default; only Envoy with WASMPROXY_DIFF_REFERENCE_ONLY=1.

    WASMPROXY_DIFF_TARGETS=wasmproxy runs wasmproxy alone against the cases' expectations;
    WASMPROXY_DIFF_TARGETS=envoy,envoy-twin compares Envoy with itself (a harness self-check).
    """
    if os.environ.get("WASMPROXY_DIFF_REFERENCE_ONLY", "") not in ("", "0"):
        return [REFERENCE]
    names = [t.strip() for t in os.environ.get("WASMPROXY_DIFF_TARGETS", "envoy,wasmproxy").split(",")]
    unknown = set(names) - set(PROCESS_CLASSES)
    if unknown:
        raise ValueError(f"WASMPROXY_DIFF_TARGETS: unknown target(s) {sorted(unknown)}")
    return names


# --- the case format ------------------------------------------------------------------------

def _headers(value: Any) -> Headers:
    if not value:
        return []
    if isinstance(value, Mapping):
        return [(str(k), str(v)) for k, v in value.items()]
    return [(str(k), str(v)) for k, v in value]


@dataclass(slots=True)
class RequestSpec:
    """One request of a case and what must hold for its outcome on every target."""

    method: str = "GET"
    path: str = "/"
    headers: Headers = field(default_factory=list)
    body: bytes | None = None
    chunked: bool = False
    raw: bytes | None = None
    host: str | None = "diff.test"
    expect_continue: bool = False
    new_connection: bool = False
    check_closed: bool = False
    write_size: int = 0
    expect: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestSpec:
        known = {"method", "path", "headers", "pad_headers", "body", "body_size", "chunked", "raw", "host",
                 "expect_continue", "new_connection", "check_closed", "write_size", "expect"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown request fields {sorted(extra)}")
        body = d.get("body")
        if "body_size" in d:
            body = pattern_bytes(0, int(d["body_size"]))
        elif body is not None:
            body = str(body).encode()
        expect = dict(d.get("expect") or {})
        headers = _headers(d.get("headers"))
        pad = d.get("pad_headers") or {}
        headers += [(f"x-pad-{i}", "p" * int(pad.get("size", 1))) for i in range(int(pad.get("count", 0)))]
        return cls(
            method=d.get("method", "GET"), path=d.get("path", "/"), headers=headers,
            body=body, chunked=bool(d.get("chunked")),
            raw=d["raw"].encode("latin-1") if "raw" in d else None,
            host=d.get("host", "diff.test"), expect_continue=bool(d.get("expect_continue")),
            new_connection=bool(d.get("new_connection")), write_size=int(d.get("write_size", 0)),
            check_closed=bool(d.get("check_closed")) or "closed" in expect, expect=expect,
        )

    @property
    def wire_method(self) -> str:
        if self.raw is not None:
            return self.raw.split(b" ", 1)[0].decode("latin-1")
        return self.method

    def describe(self) -> str:
        if self.raw is not None:
            first = self.raw.split(b"\r\n", 1)[0].decode("latin-1")
            return f"raw {first[:60]!r}"
        return f"{self.method} {self.path}"

    def head_and_body(self) -> tuple[bytes, bytes]:
        """The request bytes, split where an Expect: 100-continue client would pause."""
        if self.raw is not None:
            return self.raw, b""
        data = build_request(self.method, self.path, self.headers, self.body, host=self.host,
                             chunked=self.chunked)
        if not self.expect_continue:
            return data, b""
        split = data.index(b"\r\n\r\n") + 4
        return data[:split], data[split:]


@dataclass(slots=True)
class Case:
    """A named request sequence over one connection (reopened after the proxy closes it or
    announces that it will with ``connection: close``)."""

    name: str
    requests: list[RequestSpec]
    pipeline: bool = False
    ignore_headers: list[str] = field(default_factory=list)
    ignore_echo_headers: list[str] = field(default_factory=list)
    ignore_fields: list[str] = field(default_factory=list)
    ordered_headers: bool = False
    xfail: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Case:
        known = {"name", "requests", "pipeline", "ignore_headers", "ignore_echo_headers", "ignore_fields",
                 "ordered_headers", "xfail"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"case {d.get('name')!r}: unknown fields {sorted(extra)}")
        return cls(
            name=d["name"], requests=[RequestSpec.from_dict(r) for r in d["requests"]],
            pipeline=bool(d.get("pipeline")), ignore_headers=list(d.get("ignore_headers") or []),
            ignore_echo_headers=list(d.get("ignore_echo_headers") or []),
            ignore_fields=list(d.get("ignore_fields") or []), ordered_headers=bool(d.get("ordered_headers")),
            xfail=d.get("xfail"),
        )


@dataclass(slots=True)
class CaseFile:
    """A parsed case file: how to build the config, and the cases run against it."""

    path: Path
    config: dict[str, Any]
    cases: list[Case]

    @classmethod
    def load(cls, path: str | Path) -> CaseFile:
        path = Path(path)
        doc = yaml.safe_load(path.read_text())
        cases = [Case.from_dict(c) for c in doc.get("cases") or []]
        names = [c.name for c in cases]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"{path}: duplicate case names {sorted(dupes)}")
        return cls(path, dict(doc["config"]), cases)

    def extra_ports(self) -> list[str]:
        return list(self.config.get("ports") or [])

    def render(self, values: Mapping[str, object]) -> str:
        """The bootstrap YAML for one target, with its port values filled in."""
        if "template" in self.config:
            text = (self.path.parent / self.config["template"]).read_text()
            return render_template(text, values)
        kwargs = substitute(self.config["bootstrap"], values)
        kwargs.setdefault("listener_port", values["listener_port"])
        kwargs.setdefault("admin_port", values["admin_port"])
        return yaml.safe_dump(bootstrap(**kwargs), sort_keys=False)


def case_params(case_file: CaseFile) -> list[Any]:
    """pytest params, one per case, id'd by name; a case's `xfail` (a known wasmproxy difference)
    applies, strictly, only when wasmproxy is among the targets."""
    candidate_runs = CANDIDATE in selected_targets()
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                         if c.xfail and candidate_runs else [])
            for c in case_file.cases]


# --- running ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Target:
    """One running proxy: where to send requests and how to read its ports back out."""

    name: str
    process: ProxyProcess
    port: int
    port_names: dict[int, str]
    host: str = LOOPBACK

    def connect(self, timeout: float = REQUEST_TIMEOUT_S) -> RawConnection:
        return RawConnection(self.host, self.port, timeout=timeout)

    def normaliser(self, case: Case) -> Normaliser:
        return Normaliser(self.port_names, case.ignore_headers, case.ignore_echo_headers, case.ordered_headers)


@dataclass(slots=True)
class Result:
    """What one request got on one target."""

    outcome: Outcome
    closed: bool | None


class DiffEnvironment:
    """The selected proxies, each on its own copy of one config; start() and stop() them."""

    def __init__(self, case_file: CaseFile, workdir: Path, echo_port: int, closed_port: int,
                 targets: Iterable[str] | None = None) -> None:
        self.case_file = case_file
        self.workdir = workdir
        self.shared: dict[str, object] = {"echo_port": echo_port, "closed_port": closed_port,
                                          "repo": REPO, "cases_dir": case_file.path.parent}
        self.names = list(targets if targets is not None else selected_targets())
        self.targets: dict[str, Target] = {}

    def __enter__(self) -> DiffEnvironment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DiffEnvironment:
        """Spawn every target, then wait for all of them (they start up side by side).

        A port taken by someone else between choosing and binding it is retried with new ports.
        """
        try:
            for name in self.names:
                self.targets[name] = self._spawn(name)
            for name in self.names:
                for attempt in range(1, BIND_ATTEMPTS + 1):
                    try:
                        self.targets[name].process.wait_ready()
                        break
                    except ProcessError as e:
                        if attempt == BIND_ATTEMPTS or "already in use" not in str(e):
                            raise
                        self.targets[name].process.stop()
                        self.targets[name] = self._spawn(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str) -> Target:
        port_keys = ["listener_port", "admin_port", *self.case_file.extra_ports()]
        ports = dict(zip(port_keys, free_ports(len(port_keys))))
        text = self.case_file.render({**self.shared, **ports})
        path = write_yaml(text, self.workdir / f"{self.case_file.path.stem}.{name}.yaml")
        process = PROCESS_CLASSES[name](path)
        process.spawn()
        return Target(name, process, ports["listener_port"], {v: k for k, v in ports.items()})

    def stop(self) -> None:
        for target in self.targets.values():
            target.process.stop()
        self.targets.clear()

    def run(self, case: Case) -> None:
        """Run `case` on every target; assert expectations, then equality with Envoy."""
        # The targets are independent processes: run them side by side to halve the wall time.
        with ThreadPoolExecutor(max_workers=len(self.targets) or 1) as pool:
            futures = {name: pool.submit(run_case, case, t) for name, t in self.targets.items()}
            results = {name: f.result() for name, f in futures.items()}
        check_case(case, results, {n: t.normaliser(case) for n, t in self.targets.items()})


def _exchange(conn: RawConnection, spec: RequestSpec) -> Response:
    head, rest = spec.head_and_body()
    if spec.write_size:
        for i in range(0, len(head), spec.write_size):
            conn.send(head[i:i + spec.write_size])
    else:
        conn.send(head)
    if not rest:
        return conn.read_response(spec.wire_method)
    # Expect: 100-continue: the body goes only after the interim response (or a final one).
    first = conn.read_response(spec.wire_method, stop_at_interim=True)
    if first.status != 100:
        return first
    conn.send(rest)
    final = conn.read_response(spec.wire_method)
    final.interim[:0] = [(first.status, first.headers)]
    return final


def run_case(case: Case, target: Target) -> list[Result]:
    """Send a case's requests to one target and collect what came back."""
    results: list[Result] = []
    conn: RawConnection | None = None
    try:
        if case.pipeline:
            conn = target.connect()
            conn.send(b"".join(s.head_and_body()[0] + s.head_and_body()[1] for s in case.requests))
        for spec in case.requests:
            if not case.pipeline and (conn is None or spec.new_connection):
                if conn is not None:
                    conn.close()
                conn = target.connect()
            assert conn is not None
            try:
                response = conn.read_response(spec.wire_method) if case.pipeline else _exchange(conn, spec)
            except (PeerClosed, TimeoutError) as e:
                results.append(Result(e, isinstance(e, PeerClosed)))
                conn.close()
                conn = None
                if case.pipeline:
                    break
                continue
            closed = conn.closed_by_peer(CLOSE_CHECK_S) if spec.check_closed else None
            results.append(Result(response, closed))
            # After "connection: close" the next request must not race the proxy's close.
            if closed or (response.header("connection") or "").lower() == "close":
                conn.close()
                conn = None
                if case.pipeline:
                    break
    finally:
        if conn is not None:
            conn.close()
    return results


# --- checking ---------------------------------------------------------------------------------

def expectation_failures(spec: RequestSpec, result: Result) -> list[str]:
    """Which of `spec.expect` does not hold for `result` (empty when all hold)."""
    exp = spec.expect
    out = result.outcome
    if isinstance(out, TimeoutError):
        return [f"no response within {REQUEST_TIMEOUT_S}s"] if exp else []
    resp = out.partial if isinstance(out, PeerClosed) else out
    fails: list[str] = []
    if "outcome" in exp:
        got = "closed" if resp is None else "truncated" if not resp.complete else "response"
        if got != exp["outcome"]:
            fails.append(f"outcome: expected {exp['outcome']}, got {got}")
    if "closed" in exp and result.closed != exp["closed"]:
        fails.append(f"connection closed: expected {exp['closed']}, got {result.closed}")
    if resp is None:
        assert isinstance(out, PeerClosed)
        if {"status", "headers", "body", "body_contains", "echo"} & exp.keys():
            fails.append(f"no response: connection closed after {len(out.received)} bytes")
        return fails
    if "status" in exp and resp.status != exp["status"]:
        fails.append(f"status: expected {exp['status']}, got {resp.status}")
    if "interim" in exp and [s for s, _ in resp.interim] != exp["interim"]:
        fails.append(f"interim: expected {exp['interim']}, got {[s for s, _ in resp.interim]}")
    for name, value in (exp.get("headers") or {}).items():
        got_v = resp.header(name)
        if got_v != (None if value is None else str(value)):
            fails.append(f"header {name}: expected {value!r}, got {got_v!r}")
    if "body" in exp and resp.body != str(exp["body"]).encode():
        fails.append(f"body: expected {exp['body']!r}, got {resp.body[:200]!r}")
    if "body_contains" in exp and str(exp["body_contains"]).encode() not in resp.body:
        fails.append(f"body: expected to contain {exp['body_contains']!r}, got {resp.body[:200]!r}")
    if "echo" in exp:
        fails += _echo_failures(exp["echo"], resp)
    return fails


def _echo_failures(exp: Mapping[str, Any], resp: Response) -> list[str]:
    try:
        doc = resp.json()
    except ValueError:
        return [f"echo: body is not the echo upstream's JSON: {resp.body[:200]!r}"]
    fails = []
    for key, value in exp.items():
        if key == "headers":
            seen = {k.lower(): v for k, v in reversed(doc["headers"])}
            for name, want in value.items():
                got = seen.get(name.lower())
                if got != (None if want is None else str(want)):
                    fails.append(f"echo header {name}: expected {want!r}, got {got!r}")
        elif doc.get(key) != value:
            fails.append(f"echo {key}: expected {value!r}, got {doc.get(key)!r}")
    return fails


def check_case(case: Case, results: Mapping[str, list[Result]], normalisers: Mapping[str, Normaliser]) -> None:
    """Assert each target matches the reference and every target met every expectation.

    The message leads with the first difference from Envoy, then lists unmet expectations.
    """
    problems = [d for name in results if name != REFERENCE and REFERENCE in results
                if (d := _first_difference(case, results, normalisers, name))]
    for name, res in results.items():
        for i, (spec, r) in enumerate(zip(case.requests, res), 1):
            for f in expectation_failures(spec, r):
                problems.append(f"case {case.name!r}, request #{i} ({spec.describe()}) on {name}: {f}")
    if problems:
        raise AssertionError("\n".join(problems))


def _first_difference(case: Case, results: Mapping[str, list[Result]],
                      normalisers: Mapping[str, Normaliser], name: str) -> str | None:
    ref = [comparable(r, spec, normalisers[REFERENCE], case) for r, spec in zip(results[REFERENCE], case.requests)]
    got = [comparable(r, spec, normalisers[name], case) for r, spec in zip(results[name], case.requests)]
    for i in range(max(len(ref), len(got))):
        a: Any = ref[i] if i < len(ref) else "<no request made>"
        b: Any = got[i] if i < len(got) else "<no request made>"
        d = first_difference(a, b)
        if d:
            return format_difference(case.name, i + 1, case.requests[i].describe(), d, REFERENCE, name, a, b)
    return None


def comparable(r: Result, spec: RequestSpec, normaliser: Normaliser, case: Case) -> dict[str, Any]:
    """The normalised form of one result that check_case compares (minus the case's ignore_fields)."""
    out = normaliser(r.outcome, r.closed, sent=[v for _, v in spec.headers])
    for f in case.ignore_fields:
        out.pop(f, None)
    return out
