"""Turn a wire outcome into a comparable value, hiding only what is legitimately volatile.

Volatile means: differs between two runs of the *same* proxy or between two processes
configured identically — the date, generated request ids, measured upstream time, the server
name, and port numbers that each process was given (listener, admin) or the kernel chose.
Everything else (status, reason, header names and values, bodies, what the upstream saw)
is kept, so a difference in it is a real difference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .raw_http import PeerClosed, Response

# What one request can get: a response, a close (maybe mid-response), or nothing in time.
Outcome = Response | PeerClosed | TimeoutError

# A generated id becomes <request-id-N>, numbered by first appearance within one outcome, so
# "the response carries the id the upstream saw" is still compared; an id the client sent is
# kept as it is, so "preserved" and "regenerated" stay different.
GENERATED = "<request-id>"
# Response headers whose value is volatile: name -> placeholder (presence is still compared).
# A value is replaced only when it has the shape the header's producer gives it (FORMS), so a
# malformed date or service time still shows up as a difference.
VOLATILE_RESPONSE_HEADERS = {
    "date": "<date>",
    "x-request-id": GENERATED,
    "x-envoy-upstream-service-time": "<ms>",
    "server": "<server>",
}
# Request headers the echo upstream reports whose value is volatile. x-forwarded-for is not:
# every target sees the same loopback client and host addresses, so its value is compared.
VOLATILE_ECHO_HEADERS = {
    "x-request-id": GENERATED,
}
FORMS = {
    # IMF-fixdate, RFC 9110 §5.6.7
    "<date>": re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                         r"\d{4} \d\d:\d\d:\d\d GMT$"),
    "<ms>": re.compile(r"^\d+$"),
    "<server>": re.compile(r"^\S.*$"),
    GENERATED: re.compile(r"^.+$"),
}
# Bodies up to this many bytes are compared as text; longer ones by length and sha256.
TEXT_BODY_LIMIT = 4096

_PORT = re.compile(r"(?<![\w.:-])((?:127\.0\.0\.1|localhost|\[::1\])?):(\d{2,5})(?!\d)")


@dataclass(slots=True)
class _Ids:
    """Numbering of generated ids within one outcome."""

    sent: set[str]
    names: dict[str, str] = field(default_factory=dict)

    def name(self, value: str) -> str:
        if value in self.sent:
            return value
        return self.names.setdefault(value, f"<request-id-{len(self.names) + 1}>")


@dataclass(slots=True)
class Normaliser:
    """Normalise outcomes of one target. `ports` maps that target's own port numbers to names."""

    ports: Mapping[int, str] = field(default_factory=dict)
    ignore_headers: Iterable[str] = ()
    ignore_echo_headers: Iterable[str] = ()
    ordered_headers: bool = False

    def text(self, s: str) -> str:
        """Replace this target's port numbers (``host:port``) by their names."""
        if not self.ports:
            return s

        def repl(m: re.Match[str]) -> str:
            name = self.ports.get(int(m.group(2)))
            return f"{m.group(1)}:<{name}>" if name else m.group(0)

        return _PORT.sub(repl, s)

    def headers(self, headers: Iterable[tuple[str, str]], volatile: Mapping[str, str],
                ignore: Iterable[str], ids: _Ids | None = None) -> Any:
        skip = {n.lower() for n in ignore}
        pairs = []
        for k, v in headers:
            if k.lower() in skip:
                continue
            placeholder = volatile.get(k.lower())
            if placeholder is None or not FORMS[placeholder].match(v):
                pass
            elif placeholder == GENERATED and ids is not None:
                v = ids.name(v)
            else:
                v = placeholder
            pairs.append((k, self.text(v)))
        if self.ordered_headers:
            return [f"{k}: {v}" for k, v in pairs]
        grouped: dict[str, list[str]] = {}
        for k, v in sorted(pairs, key=lambda kv: kv[0].lower()):
            grouped.setdefault(k, []).append(v)
        return grouped

    def body(self, resp: Response, ids: _Ids) -> Any:
        ctype = (resp.header("content-type") or "").lower()
        if ctype.startswith("application/json"):
            try:
                doc = json.loads(resp.body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and {"method", "headers", "body_sha256"} <= doc.keys():
                return self.echo(doc, ids)
        if len(resp.body) <= TEXT_BODY_LIMIT:
            try:
                return self.text(resp.body.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        return {"length": len(resp.body), "sha256": resp.body_sha256}

    def echo(self, doc: dict[str, Any], ids: _Ids) -> dict[str, Any]:
        """What the echo upstream reported, with its volatile parts hidden."""
        out = dict(doc)
        out["path"] = self.text(doc["path"])
        out["headers"] = self.headers(doc["headers"], VOLATILE_ECHO_HEADERS, self.ignore_echo_headers, ids)
        out["trailers"] = self.headers(doc.get("trailers") or [], {}, ())
        if isinstance(doc.get("body"), str):
            out["body"] = self.text(doc["body"])
        return out

    def __call__(self, outcome: Outcome, closed: bool | None = None, sent: Iterable[str] = ()) -> dict[str, Any]:
        """The comparable form of one outcome; `closed` is whether the peer then closed (if checked),
        `sent` the header values the client sent (never treated as generated)."""
        if isinstance(outcome, TimeoutError):
            return {"outcome": "no response before the deadline"}
        if isinstance(outcome, PeerClosed) and outcome.partial is None:
            out: dict[str, Any] = {"outcome": "closed before a response",
                                   "received": self.text(outcome.received.decode("latin-1"))}
            return out
        resp = outcome.partial if isinstance(outcome, PeerClosed) else outcome
        assert resp is not None
        ids = _Ids(set(sent))
        out = {
            "outcome": "response" if resp.complete else "truncated response",
            "status": resp.status,
            "reason": resp.reason,
            "version": resp.version,
            "interim": [s for s, _ in resp.interim],
            # The body before the headers: when both differ, content-length is only the echo of
            # the body's difference, so the body makes the more useful first difference.
            "body": self.body(resp, ids) if resp.complete else "<truncated: how much arrived is a race>",
            "headers": self.headers(resp.headers, VOLATILE_RESPONSE_HEADERS, self.ignore_headers, ids),
        }
        if resp.trailers:
            out["trailers"] = self.headers(resp.trailers, {}, ())
        if closed is not None:
            out["connection_closed"] = closed
        return out
