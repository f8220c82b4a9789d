"""The route table: RouteConfiguration -> virtual hosts -> routes, as Envoy's router/config_impl.cc.

`RouteConfig.from_proto(route_configuration)` is built once (main thread) and is
immutable afterwards, so every worker shares it. `RouteConfig.route(headers, stream_id)`
picks the virtual host by host header and the first matching route.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from google.protobuf.json_format import MessageToDict

from ..http.headers import HeaderMap
from ..http.stream_info import StreamInfo
from .hash_policy import HashPolicy
from .header_parser import HeaderParser
from .matchers import HeaderMatcher, MatcherConfigError, QueryParameterMatcher, compile_regex, parse_query
from .retry import RetryPolicy

DEFAULT_ROUTE_TIMEOUT_MS = 15000

# envoy.config.route.v3.RedirectAction.RedirectResponseCode -> status.
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
# envoy.config.route.v3.RouteAction.ClusterNotFoundResponseCode -> status.
_CLUSTER_NOT_FOUND_CODES = {0: 503, 1: 404, 2: 500}


class RouteConfigError(ValueError):
    """A RouteConfiguration Envoy would reject; the message is Envoy's where it has one."""


def _metadata(proto: Any, owner: Any) -> dict[str, Any]:
    if not owner.HasField("metadata"):
        return {}
    return MessageToDict(proto.metadata, preserving_proto_field_name=True).get("filter_metadata", {})


def _ms(duration: Any) -> int:
    return duration.seconds * 1000 + duration.nanos // 1_000_000


def _split_query(path: str) -> tuple[str, str]:
    """('/a/b', '?x=1') — the query (and fragment) kept verbatim with its '?'."""
    if "?" not in path and "#" not in path:
        return path, ""
    q = path.find("?")
    h = path.find("#")
    if h >= 0 and (q < 0 or h < q):
        q = h
    return (path, "") if q < 0 else (path[:q], path[q:])


def strip_port(host: str) -> str:
    """Host without ':port' (IPv6 literals keep their brackets)."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host[colon + 1 :].isdigit():
        return host[:colon]
    return host


class Route:
    """One route: its match, its action (route / direct_response / redirect) and its header mutations."""

    # True once finalize_request_headers / finalize_response_headers are known to change nothing
    # (no header parsers at any level, no host or path rewrite): the router then skips the call.
    # Learnt on their first call, which builds the parsers.
    finalize_request_noop = False
    finalize_response_noop = False

    def __init__(self, proto: Any, vhost: "VirtualHost") -> None:
        self.virtual_host = vhost
        self.name: str = proto.name
        self.metadata = _metadata(proto, proto)
        self.typed_per_filter_config: dict[str, Any] = dict(proto.typed_per_filter_config)
        self._build_match(proto.match)
        self.request_headers_parser = HeaderParser(proto.request_headers_to_add, proto.request_headers_to_remove)
        self.response_headers_parser = HeaderParser(proto.response_headers_to_add, proto.response_headers_to_remove)
        # The non-empty parsers of route, vhost and config, in evaluation order (built on first use).
        self._request_parsers: list[HeaderParser] | None = None
        self._response_parsers: list[HeaderParser] | None = None

        self.action: str = proto.WhichOneof("action") or ""
        if self.action not in ("route", "direct_response", "redirect"):
            raise RouteConfigError(f"route action '{self.action or 'none'}' is not supported")
        # route action
        self.cluster_name = ""
        self.cluster_header = ""
        self.weighted_clusters: list[tuple[str, int]] = []
        self.cluster_not_found_response_code = 503
        self.timeout_ms = DEFAULT_ROUTE_TIMEOUT_MS
        self.idle_timeout_ms: int | None = None
        self.prefix_rewrite = ""
        self.regex_rewrite: tuple[re.Pattern[str], str] | None = None
        self.host_rewrite_literal = ""
        self.host_rewrite_header = ""
        self.host_rewrite_path_regex: tuple[re.Pattern[str], str] | None = None
        self.auto_host_rewrite = False
        self.append_x_forwarded_host = False
        self.retry_policy: RetryPolicy | None = vhost.retry_policy
        self.hash_policy = HashPolicy(())
        # (cluster, (numerator, denominator) or None for always, append the "-shadow" host suffix)
        self.mirror_policies: list[tuple[str, tuple[int, int] | None, bool]] = []
        # direct_response
        self.direct_status = 0
        self.direct_body = b""
        # redirect
        self.redirect: Any = None
        self.redirect_code = 301
        if self.action == "route":
            self._build_route_action(proto.route)
        elif self.action == "direct_response":
            self.direct_status = proto.direct_response.status
            if not 200 <= self.direct_status <= 599:
                raise RouteConfigError("direct_response status must be in [200, 599]")
            self.direct_body = _data_source(proto.direct_response.body)
        else:
            r = proto.redirect
            self.redirect = r
            self.redirect_code = _REDIRECT_CODES.get(r.response_code, 301)
            self.prefix_rewrite = r.prefix_rewrite
            if r.HasField("regex_rewrite"):
                self.regex_rewrite = (compile_regex(r.regex_rewrite.pattern), r.regex_rewrite.substitution)

    # -- matching ---------------------------------------------------------------------------

    def _build_match(self, m: Any) -> None:
        self.case_sensitive = m.case_sensitive.value if m.HasField("case_sensitive") else True
        kind = m.WhichOneof("path_specifier")
        if kind not in ("prefix", "path", "safe_regex", "path_separated_prefix"):
            raise RouteConfigError(f"route match '{kind}' is not supported")
        self.match_kind: str = kind
        self.match_value: str = "" if kind == "safe_regex" else getattr(m, kind)
        if kind == "path_separated_prefix" and (
            "?" in self.match_value or "#" in self.match_value or self.match_value.endswith("/")
        ):
            raise RouteConfigError("path_separated_prefix must not end with '/' nor contain '?' or '#'")
        self._match_cmp = self.match_value if self.case_sensitive else self.match_value.lower()
        self._match_len = len(self._match_cmp)
        self.match_regex = compile_regex(m.safe_regex) if kind == "safe_regex" else None
        self.header_matchers = [HeaderMatcher(h) for h in m.headers]
        self.query_matchers = [QueryParameterMatcher(q) for q in m.query_parameters]
        self.grpc_only = m.HasField("grpc")
        if len(m.dynamic_metadata) or len(m.filter_state):
            raise RouteConfigError("route match on dynamic_metadata / filter_state is not supported")
        # wasmproxy listens in plaintext only: a route that requires a presented or validated
        # client certificate never matches, one that requires none always does.
        tls = m.tls_context
        self.never_matches = m.HasField("tls_context") and (
            (tls.HasField("presented") and tls.presented.value) or (tls.HasField("validated") and tls.validated.value)
        )
        self.runtime_fraction: tuple[int, int] | None = None
        if m.HasField("runtime_fraction"):
            dv = m.runtime_fraction.default_value
            self.runtime_fraction = (dv.numerator, (100, 10_000, 1_000_000)[dv.denominator])

    def matches(self, headers: HeaderMap, stream_id: int, path_header: str | None = None, path: str = "") -> bool:
        """Whether this route takes the request; `path_header`/`path` (without query) may be passed in
        by a caller that matches many routes against the same request."""
        if path_header is None:
            path_header = headers.get(":path")
            if path_header is None:
                return False
            path = _split_query(path_header)[0]
        cmp = path if self.case_sensitive else path.lower()
        kind = self.match_kind
        if kind == "prefix":
            ok = cmp[: self._match_len] == self._match_cmp  # startswith, without a call
        elif kind == "path":
            ok = cmp == self._match_cmp
        elif kind == "path_separated_prefix":
            n = len(self._match_cmp)
            ok = cmp.startswith(self._match_cmp) and (len(cmp) == n or cmp[n] == "/")
        else:
            assert self.match_regex is not None
            ok = self.match_regex.fullmatch(path) is not None
        if not ok or self.never_matches:
            return False
        if self.runtime_fraction is not None:
            numerator, denominator = self.runtime_fraction
            if stream_id % denominator >= numerator:
                return False
        if self.grpc_only and not (headers.get("content-type") or "").startswith("application/grpc"):
            return False
        for hm in self.header_matchers:
            if not hm.match(headers):
                return False
        if self.query_matchers:
            params = parse_query(path_header)
            for qm in self.query_matchers:
                if not qm.match(params):
                    return False
        return True

    # -- route action ---------------------------------------------------------------------------

    def _build_route_action(self, a: Any) -> None:
        spec = a.WhichOneof("cluster_specifier")
        if spec == "cluster":
            self.cluster_name = a.cluster
        elif spec == "cluster_header":
            self.cluster_header = a.cluster_header.lower()
        elif spec == "weighted_clusters":
            self.weighted_clusters = [(c.name, c.weight.value) for c in a.weighted_clusters.clusters]
            if sum(w for _, w in self.weighted_clusters) <= 0:
                raise RouteConfigError("Sum of weights in the weighted_cluster must be greater than 0.")
        else:
            raise RouteConfigError(f"cluster specifier '{spec}' is not supported")
        self.cluster_not_found_response_code = _CLUSTER_NOT_FOUND_CODES[a.cluster_not_found_response_code]
        if a.HasField("timeout"):
            self.timeout_ms = _ms(a.timeout)
        if a.HasField("idle_timeout"):
            self.idle_timeout_ms = _ms(a.idle_timeout)
        self.prefix_rewrite = a.prefix_rewrite
        if a.HasField("regex_rewrite"):
            self.regex_rewrite = (compile_regex(a.regex_rewrite.pattern), a.regex_rewrite.substitution)
        if self.prefix_rewrite and self.regex_rewrite:
            raise RouteConfigError("Cannot specify both prefix_rewrite and regex_rewrite")
        self.host_rewrite_literal = a.host_rewrite_literal
        self.host_rewrite_header = a.host_rewrite_header.lower()
        self.host_rewrite_path_regex: tuple[re.Pattern[str], str] | None = None
        if a.HasField("host_rewrite_path_regex"):
            hp = a.host_rewrite_path_regex
            self.host_rewrite_path_regex = (compile_regex(hp.pattern), hp.substitution)
        if a.HasField("path_rewrite_policy"):
            raise RouteConfigError("path_rewrite_policy (URI templates) is not supported")
        self.auto_host_rewrite = a.auto_host_rewrite.value if a.HasField("auto_host_rewrite") else False
        self.append_x_forwarded_host = a.append_x_forwarded_host
        if a.HasField("retry_policy"):
            self.retry_policy = RetryPolicy.from_proto(a.retry_policy)
        self.hash_policy = HashPolicy(a.hash_policy)
        # The route's mirror policies replace the virtual host's.
        self.mirror_policies = [_mirror_policy(m) for m in a.request_mirror_policies] or self.virtual_host.mirror_policies

    def cluster_for(self, headers: HeaderMap, stream_id: int) -> str:
        """The target cluster: fixed, from a header, or weighted by stream_id as Envoy does."""
        if self.cluster_name:
            return self.cluster_name
        if self.cluster_header:
            return headers.get(self.cluster_header) or ""
        total = sum(w for _, w in self.weighted_clusters)
        pick = stream_id % total
        for name, weight in self.weighted_clusters:
            if pick < weight:
                return name
            pick -= weight
        return self.weighted_clusters[-1][0]  # pragma: no cover - the loop always returns

    def rewritten_path(self, path_header: str) -> str | None:
        """The :path after prefix_rewrite / regex_rewrite, or None when neither applies."""
        path, query = _split_query(path_header)
        if self.prefix_rewrite:
            if self.match_kind in ("prefix", "path_separated_prefix"):
                return self.prefix_rewrite + path[len(self.match_value) :] + query
            return self.prefix_rewrite + query
        if self.regex_rewrite is not None:
            pattern, substitution = self.regex_rewrite
            return pattern.sub(substitution, path) + query
        return None

    # -- header mutations ---------------------------------------------------------------------------

    def _parsers(self, request: bool) -> list[HeaderParser]:
        if request:
            if self._request_parsers is None:
                self._request_parsers = self._build_parsers(True)
            return self._request_parsers
        if self._response_parsers is None:
            self._response_parsers = self._build_parsers(False)
        return self._response_parsers

    def _build_parsers(self, request: bool) -> list[HeaderParser]:
        vh = self.virtual_host
        rc = vh.route_config
        if request:
            levels = [self.request_headers_parser, vh.request_headers_parser, rc.request_headers_parser]
        else:
            levels = [self.response_headers_parser, vh.response_headers_parser, rc.response_headers_parser]
        # Envoy evaluates the most specific level first so that, by default, the least specific
        # one's overwrite wins; most_specific_header_mutations_wins flips the order.
        if rc.most_specific_header_mutations_wins:
            levels.reverse()
        return [p for p in levels if p]

    def finalize_request_headers(
        self, headers: HeaderMap, info: StreamInfo, keep_original_host_or_path: bool = True
    ) -> None:
        """Headers to add/remove (route, vhost, config), then host and path rewrites."""
        parsers = self._request_parsers
        if parsers is None:
            parsers = self._parsers(True)
            self.finalize_request_noop = (
                not parsers and not self.host_rewrite_literal and not self.host_rewrite_header
                and self.host_rewrite_path_regex is None and not self.prefix_rewrite and self.regex_rewrite is None
            )
        for parser in parsers:
            parser.evaluate(headers, info)
        new_host = self.host_rewrite_literal
        if not new_host and self.host_rewrite_header:
            new_host = headers.get(self.host_rewrite_header) or ""
        if not new_host and self.host_rewrite_path_regex is not None:
            pattern, substitution = self.host_rewrite_path_regex
            new_host = pattern.sub(substitution, _split_query(headers.get(":path") or "")[0])
        if new_host:
            update_authority(headers, new_host, self.append_x_forwarded_host, keep_original_host_or_path)
        if not self.prefix_rewrite and self.regex_rewrite is None:
            return  # rewritten_path() would be None
        path = headers.get(":path")
        if path is not None:
            new_path = self.rewritten_path(path)
            if new_path is not None:
                if keep_original_host_or_path:
                    headers.set("x-envoy-original-path", path)
                headers.set(":path", new_path)

    def finalize_response_headers(
        self, headers: HeaderMap, info: StreamInfo, request_headers: HeaderMap | None = None
    ) -> None:
        parsers = self._response_parsers
        if parsers is None:
            parsers = self._parsers(False)
            self.finalize_response_noop = not parsers
        for parser in parsers:
            parser.evaluate(headers, info, request_headers)

    def per_filter_config(self, name: str) -> Any | None:
        """The most specific typed_per_filter_config for filter `name` (route > vhost > config)."""
        for level in (self.typed_per_filter_config, self.virtual_host.typed_per_filter_config,
                      self.virtual_host.route_config.typed_per_filter_config):
            if name in level:
                return level[name]
        return None

    # -- redirect ---------------------------------------------------------------------------

    def redirect_location(self, headers: HeaderMap) -> str:
        """The Location for a redirect route (RouteEntryImplBase::newUri, basic cases)."""
        r = self.redirect
        orig_scheme = headers.get("x-forwarded-proto") or headers.get(":scheme") or "http"
        scheme = "https" if r.https_redirect else (r.scheme_redirect or orig_scheme)
        authority = headers.get(":authority") or ""
        host = r.host_redirect or strip_port(authority)
        port = ""
        if r.port_redirect:
            port = f":{r.port_redirect}"
        elif not r.host_redirect:
            orig_port = authority[len(strip_port(authority)) :]
            # A scheme change drops the old scheme's default port, as Envoy does.
            if not (scheme != orig_scheme and orig_port in (":80", ":443")):
                port = orig_port
        path_header = headers.get(":path") or "/"
        _, orig_query = _split_query(path_header)
        if r.path_redirect:
            path = r.path_redirect
            if "?" not in path and not r.strip_query:
                path += orig_query
        else:
            path = self.rewritten_path(path_header) or path_header
            if r.strip_query:
                path = _split_query(path)[0]
        return f"{scheme}://{host}{port}{path}"


def _mirror_policy(m: Any) -> tuple[str, tuple[int, int] | None, bool]:
    if m.cluster_header:
        raise RouteConfigError("request_mirror_policies.cluster_header is not supported")
    fraction = None
    if m.HasField("runtime_fraction"):
        dv = m.runtime_fraction.default_value
        fraction = (dv.numerator, (100, 10_000, 1_000_000)[dv.denominator])
    return m.cluster, fraction, not m.disable_shadow_host_suffix_append


def shadow_authority(host: str) -> str:
    """Envoy's shadow host: "-shadow" appended to the host name, before any port."""
    name = strip_port(host)
    return name + "-shadow" + host[len(name):]


def update_authority(headers: HeaderMap, host: str, append_xfh: bool, keep_original: bool) -> None:
    """Http::Utility::updateAuthority: rewrite :authority, keeping the old one where asked."""
    old = headers.get(":authority") or ""
    if append_xfh and old:
        existing = headers.get("x-forwarded-host")
        headers.set("x-forwarded-host", f"{existing},{old}" if existing else old)
    if keep_original and old:
        headers.set("x-envoy-original-host", old)
    headers.set(":authority", host)


def _data_source(ds: Any) -> bytes:
    kind = ds.WhichOneof("specifier")
    if kind is None:
        return b""
    if kind == "inline_string":
        return ds.inline_string.encode()
    if kind == "inline_bytes":
        return bytes(ds.inline_bytes)
    if kind == "filename":
        try:
            with open(ds.filename, "rb") as f:
                return f.read()
        except OSError as e:
            raise RouteConfigError(f"cannot read {ds.filename}: {e.strerror}") from None
    raise RouteConfigError(f"data source '{kind}' is not supported")


class SslRedirectRoute:
    """What a virtual host with require_tls answers a plaintext request: a 301 to https
    (Envoy's SslRedirectRoute; no header mutations)."""

    action = "redirect"
    redirect_code = 301
    name = ""
    metadata: dict[str, Any] = {}

    def __init__(self, vhost: "VirtualHost") -> None:
        self.virtual_host = vhost

    def redirect_location(self, headers: HeaderMap) -> str:
        return f"https://{headers.get(':authority') or ''}{headers.get(':path') or ''}"

    def finalize_response_headers(self, headers: HeaderMap, info: StreamInfo,
                                  request_headers: HeaderMap | None = None) -> None:
        pass

    def per_filter_config(self, name: str) -> Any | None:
        return None


class VirtualHost:
    def __init__(self, proto: Any, config: "RouteConfig") -> None:
        self.route_config = config
        self.name: str = proto.name
        self.domains = [d.lower() for d in proto.domains]
        self.metadata = _metadata(proto, proto)
        self.typed_per_filter_config: dict[str, Any] = dict(proto.typed_per_filter_config)
        self.request_headers_parser = HeaderParser(proto.request_headers_to_add, proto.request_headers_to_remove)
        self.response_headers_parser = HeaderParser(proto.response_headers_to_add, proto.response_headers_to_remove)
        if proto.HasField("matcher"):
            raise RouteConfigError("virtual_hosts.matcher is not supported")
        self.retry_policy = RetryPolicy.from_proto(proto.retry_policy) if proto.HasField("retry_policy") else None
        # RequireTls: 1 EXTERNAL_ONLY, 2 ALL (judged by x-forwarded-proto, as Envoy does).
        self.require_tls: int = proto.require_tls
        self._ssl_redirect = SslRedirectRoute(self)
        self.mirror_policies = [_mirror_policy(m) for m in proto.request_mirror_policies]
        self.include_request_attempt_count: bool = proto.include_request_attempt_count
        self.include_attempt_count_in_response: bool = proto.include_attempt_count_in_response
        self.routes = [Route(r, self) for r in proto.routes]

    def route(self, headers: HeaderMap, stream_id: int) -> "Route | SslRedirectRoute | None":
        if self.require_tls and headers.get("x-forwarded-proto") != "https" and (
            self.require_tls == 2 or headers.get("x-envoy-internal") != "true"
        ):
            return self._ssl_redirect
        path_header = headers.get(":path")
        if path_header is None:
            return None  # every path matcher needs a :path (CONNECT has none)
        path = path_header if "?" not in path_header and "#" not in path_header else _split_query(path_header)[0]
        for r in self.routes:
            if r.matches(headers, stream_id, path_header, path):
                return r
        return None


class RouteConfig:
    """An immutable route table shared by all workers."""

    def __init__(self) -> None:
        self.name = ""
        self.virtual_hosts: list[VirtualHost] = []
        self._exact: dict[str, VirtualHost] = {}
        # wildcard text without '*' -> vhost, grouped by length, longest first.
        self._suffixes: list[tuple[int, dict[str, VirtualHost]]] = []
        self._prefixes: list[tuple[int, dict[str, VirtualHost]]] = []
        self._default: VirtualHost | None = None
        self.request_headers_parser = HeaderParser((), ())
        self.response_headers_parser = HeaderParser((), ())
        self.most_specific_header_mutations_wins = False
        self.ignore_port_in_host_matching = False
        self.vhost_header = ":authority"
        self.internal_only_headers: list[str] = []
        self.typed_per_filter_config: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}
        # The route memo (see route()): the request headers whose first values alone decide the
        # match, or None when the table reads more (header matchers, runtime fractions).
        self._memo_keys: tuple[str, ...] | None = None
        self._memo: dict[Any, Route | SslRedirectRoute | None] = {}

    @classmethod
    def from_proto(
        cls, proto: Any, cluster_exists: Callable[[str], bool] | None = None, validate_clusters_default: bool = True
    ) -> "RouteConfig":
        """Build from envoy.config.route.v3.RouteConfiguration.

        With `cluster_exists`, fixed cluster names are checked as Envoy's validate_clusters does
        (on by default for static route configs).
        """
        self = cls()
        self.name = proto.name
        self.metadata = _metadata(proto, proto)
        self.most_specific_header_mutations_wins = proto.most_specific_header_mutations_wins
        self.ignore_port_in_host_matching = proto.ignore_port_in_host_matching
        if proto.vhost_header:
            self.vhost_header = proto.vhost_header.lower()
        self.internal_only_headers = [h.lower() for h in proto.internal_only_headers]
        self.typed_per_filter_config = dict(proto.typed_per_filter_config)
        try:
            self.request_headers_parser = HeaderParser(proto.request_headers_to_add, proto.request_headers_to_remove)
            self.response_headers_parser = HeaderParser(
                proto.response_headers_to_add, proto.response_headers_to_remove
            )
            self.virtual_hosts = [VirtualHost(v, self) for v in proto.virtual_hosts]
        except MatcherConfigError as e:
            raise RouteConfigError(str(e)) from None
        suffixes: dict[int, dict[str, VirtualHost]] = {}
        prefixes: dict[int, dict[str, VirtualHost]] = {}
        for vh in self.virtual_hosts:
            for domain in vh.domains:
                if domain == "*":
                    if self._default is not None:
                        raise RouteConfigError(
                            f"Only a single wildcard domain is permitted in route {self.name}"
                        )
                    self._default = vh
                    continue
                if domain.startswith("*"):
                    table = suffixes.setdefault(len(domain) - 1, {})
                    key = domain[1:]
                elif domain.endswith("*"):
                    table = prefixes.setdefault(len(domain) - 1, {})
                    key = domain[:-1]
                else:
                    table, key = self._exact, domain
                if key in table:
                    raise RouteConfigError(
                        f"Only unique values for domains are permitted. Duplicate entry of domain {domain}"
                        f" in route {self.name}"
                    )
                table[key] = vh
        self._suffixes = sorted(suffixes.items(), reverse=True)
        self._prefixes = sorted(prefixes.items(), reverse=True)
        validate = proto.validate_clusters.value if proto.HasField("validate_clusters") else validate_clusters_default
        if validate and cluster_exists is not None:
            for vh in self.virtual_hosts:
                for r in vh.routes:
                    names = [r.cluster_name] if r.cluster_name else [n for n, _ in r.weighted_clusters]
                    for n in names:
                        if n and not cluster_exists(n):
                            raise RouteConfigError(f"route: unknown cluster '{n}'")
        self._memo_keys = self._match_keys()
        return self

    def _match_keys(self) -> tuple[str, ...] | None:
        """The headers route() reads, each only by its first value (HeaderMap.get), or None
        when it depends on more: all values of a header (header matchers) or the stream id
        (runtime_fraction)."""
        keys = [":path"]
        if self._exact or self._suffixes or self._prefixes:
            keys.append(self.vhost_header)
        for vh in self.virtual_hosts:
            if vh.require_tls:
                keys += ("x-forwarded-proto", "x-envoy-internal")
            for r in vh.routes:
                if r.header_matchers or r.runtime_fraction is not None:
                    return None
                if r.grpc_only:
                    keys.append("content-type")
        # Lower-case, as HeaderMap keys: route() reads the map's first-value index with them.
        return tuple(dict.fromkeys(key.lower() for key in keys))

    def virtual_host(self, headers: HeaderMap) -> VirtualHost | None:
        """Envoy's precedence: exact, then `*suffix` longest first, then `prefix*` longest first, then `*`."""
        if not self._exact and not self._suffixes and not self._prefixes:
            return self._default
        host = (headers.get(self.vhost_header) or "").lower()
        if self.ignore_port_in_host_matching:
            host = strip_port(host)
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        n = len(host)
        for length, table in self._suffixes:
            if length < n:
                vh = table.get(host[n - length :])
                if vh is not None:
                    return vh
        for length, table in self._prefixes:
            if length < n:
                vh = table.get(host[:length])
                if vh is not None:
                    return vh
        return self._default

    def route(self, headers: HeaderMap, stream_id: int = 0) -> "Route | SslRedirectRoute | None":
        """The route for a request. When the match depends only on the first values of a few
        headers (`_memo_keys`), the answer is memoized on those values: the same values always
        select the same route (a filter that adds an unrelated header clears the stream's route
        cache, and requests repeat paths)."""
        keys = self._memo_keys
        if keys is None:
            return self._route(headers, stream_id)
        index = headers.first_values
        key = index.get(":path") if len(keys) == 1 else tuple(map(index.get, keys))
        memo = self._memo
        route = memo.get(key, _MISSING)
        if route is not _MISSING:
            return route  # type: ignore[return-value]
        route = self._route(headers, stream_id)
        if _memo_key_size(key) <= _MEMO_MAX_KEY_CHARS:
            if len(memo) >= _MEMO_MAX_ENTRIES:
                memo.clear()  # workers share the table: clear() and a set are each atomic
            memo[key] = route
        return route

    def _route(self, headers: HeaderMap, stream_id: int) -> "Route | SslRedirectRoute | None":
        if not self._exact and not self._suffixes and not self._prefixes:
            vh = self._default  # only a "*" virtual host (virtual_host()'s first case, without the call)
        else:
            vh = self.virtual_host(headers)
        return vh.route(headers, stream_id) if vh is not None else None


# Route memo bounds: entries per route table, and characters of header values per entry.
_MEMO_MAX_ENTRIES = 4096
_MEMO_MAX_KEY_CHARS = 1024
_MISSING = object()


def _memo_key_size(key: Any) -> int:
    if key is None or type(key) is str:
        return len(key or "")
    return sum(len(v) for v in key if v is not None)
