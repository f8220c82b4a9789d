"""envoy.filters.network.tcp_proxy: `tcp_proxy.py` the filter, `upstream.py` its upstream connection."""
