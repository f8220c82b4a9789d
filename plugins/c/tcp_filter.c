/*
 * tcp_filter: a Proxy-Wasm network (L4) filter, ABI 0.2.1.
 *
 * Configuration lines (each optional):
 *   prefix <text>    prepended once, to the first downstream (upstream-bound) bytes
 *   magic <word>     downstream data containing it closes the connection (close_stream DOWNSTREAM)
 *   hold <word>      downstream data containing it is held (StopIteration; later bytes join it)
 *                    until data containing "release" arrives, then all of it goes on at once
 *   upper            upstream responses are rewritten to upper case (set_buffer_bytes UPSTREAM_DATA)
 * Counters (proxy_define_metric): tcp_filter.connections, tcp_filter.downstream_bytes (bytes the
 * plugin saw per callback, so a held buffer counts again), tcp_filter.upstream_bytes,
 * tcp_filter.downstream_close, tcp_filter.upstream_close, tcp_filter.logs.
 * Every callback logs at info: "tcp_filter <callback> <args>" (tests compare the sequence).
 */
#include "proxy_wasm.h"

typedef struct {
  char prefix[128];
  char magic[64];
  char hold[64];
  int upper;
} root_state;

typedef struct {
  root_state *root;
  int prefixed;
} conn_state;

static uint32_t m_connections, m_down_bytes, m_up_bytes, m_down_close, m_up_close, m_logs;

static void define(const char *name, uint32_t *id) { proxy_define_metric(PW_COUNTER, name, strlen(name), id); }

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (!parent) {
    pw_ctx_set(context_id, calloc(1, sizeof(root_state)));
    return;
  }
  conn_state *c = calloc(1, sizeof *c);
  c->root = pw_ctx_get(parent);
  pw_ctx_set(context_id, c);
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) {
  define("tcp_filter.connections", &m_connections);
  define("tcp_filter.downstream_bytes", &m_down_bytes);
  define("tcp_filter.upstream_bytes", &m_up_bytes);
  define("tcp_filter.downstream_close", &m_down_close);
  define("tcp_filter.upstream_close", &m_up_close);
  define("tcp_filter.logs", &m_logs);
  return 1;
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "prefix")) snprintf(r->prefix, sizeof r->prefix, "%s", line);
    if (!strcmp(key, "magic")) snprintf(r->magic, sizeof r->magic, "%s", line);
    if (!strcmp(key, "hold")) snprintf(r->hold, sizeof r->hold, "%s", line);
    if (!strcmp(key, "upper")) r->upper = 1;
  }
  pw_bytes_free(&config);
  return 1;
}

PW_EXPORT(proxy_on_new_connection) uint32_t on_new_connection(uint32_t context_id) {
  proxy_increment_metric(m_connections, 1);
  pw_logf(PW_LOG_INFO, "tcp_filter new_connection");
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_downstream_data) uint32_t on_downstream_data(uint32_t context_id, uint32_t size, uint32_t eos) {
  conn_state *c = pw_ctx_get(context_id);
  root_state *r = c->root;
  pw_bytes data;
  pw_get_buffer(PW_DOWNSTREAM_DATA, 0, size, &data);
  proxy_increment_metric(m_down_bytes, (int64_t)size);
  pw_logf(PW_LOG_INFO, "tcp_filter downstream_data %u %u", size, eos);
  uint32_t result = PW_CONTINUE;
  if (r->magic[0] && strstr(data.data, r->magic)) {
    proxy_close_stream(PW_STREAM_DOWNSTREAM);
    result = PW_STOP_ITERATION;
  } else if (r->hold[0] && strstr(data.data, r->hold) && !strstr(data.data, "release")) {
    result = PW_STOP_ITERATION;
  } else if (r->prefix[0] && !c->prefixed && size > 0) {
    c->prefixed = 1;
    proxy_set_buffer_bytes(PW_DOWNSTREAM_DATA, 0, 0, r->prefix, strlen(r->prefix));
  }
  pw_bytes_free(&data);
  return result;
}

PW_EXPORT(proxy_on_upstream_data) uint32_t on_upstream_data(uint32_t context_id, uint32_t size, uint32_t eos) {
  conn_state *c = pw_ctx_get(context_id);
  proxy_increment_metric(m_up_bytes, (int64_t)size);
  pw_logf(PW_LOG_INFO, "tcp_filter upstream_data %u %u", size, eos);
  if (c->root->upper && size > 0) {
    pw_bytes data;
    pw_get_buffer(PW_UPSTREAM_DATA, 0, size, &data);
    for (size_t i = 0; i < data.len; i++)
      if (data.data[i] >= 'a' && data.data[i] <= 'z') data.data[i] -= 32;
    proxy_set_buffer_bytes(PW_UPSTREAM_DATA, 0, data.len, data.data, data.len);
    pw_bytes_free(&data);
  }
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_downstream_connection_close) void on_downstream_close(uint32_t context_id, uint32_t type) {
  proxy_increment_metric(m_down_close, 1);
  pw_logf(PW_LOG_INFO, "tcp_filter downstream_close %u", type);
}

PW_EXPORT(proxy_on_upstream_connection_close) void on_upstream_close(uint32_t context_id, uint32_t type) {
  proxy_increment_metric(m_up_close, 1);
  pw_logf(PW_LOG_INFO, "tcp_filter upstream_close %u", type);
}

PW_EXPORT(proxy_on_log) void on_log(uint32_t context_id) {
  proxy_increment_metric(m_logs, 1);
  pw_logf(PW_LOG_INFO, "tcp_filter log");
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  conn_state *c = pw_ctx_take(context_id);
  free(c);
}
