"""Routing: the route table and the router filter.

* `config.RouteConfig.from_proto(route_configuration, cluster_exists=None)` builds an immutable
  table (main thread) shared by every worker; `.route(headers, stream_id) -> Route | None`.
* `config.Route`: the matched route (`action`, `cluster_for()`, `timeout_ms`, `idle_timeout_ms`,
  `finalize_request_headers()`, `finalize_response_headers()`, `per_filter_config()`, `name`,
  `metadata`).
* `router_filter.create_router_filter_factory(proto, factory_context)`: the
  envoy.filters.http.router factory; `factory_context.cluster_manager` is required,
  `factory_context.extras["http_stat_prefix"]` enables the http.<prefix>.* router stats.
"""
