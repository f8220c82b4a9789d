"""Upstream: clusters, load balancing, HTTP/1 connection pools and the AsyncClient.

* `cluster_manager.ClusterManager(cluster_protos, main_dispatcher, tls, store, store_for=None)`
  (or `.from_bootstrap(bootstrap, ...)`), main thread: `initialize(on_done)`, `has_cluster()`,
  `thread_local()`, `shutdown()`, `clusters` (name -> `cluster.Cluster`, for admin).
* Per thread, `ClusterManager.thread_local() -> ThreadLocalClusterManager`: `get(name) ->
  ThreadLocalCluster | None` (`choose_host()`, `conn_pool(host)`, `stats`, `info`) and
  `http_async_client() -> async_client.AsyncClient` (`send(cluster, headers, body, trailers,
  timeout_ms, callbacks)`, as Wasm http_call uses it).
"""
