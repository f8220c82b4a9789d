"""L4: downstream connections whose bytes run through a chain of network filters.

`filter.py` the network filter API (statuses, close types, events), `filter_manager.py`
Envoy's Network::FilterManagerImpl, `connection.py` a downstream connection (asyncio
Protocol) that owns one, `listener.py` the per-worker handler a listener serves with.
"""
