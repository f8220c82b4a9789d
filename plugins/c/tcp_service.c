/*
 * tcp_service: the WasmService pattern (envoy.bootstrap.wasm) with its HTTP readers, ABI 0.2.1.
 * (Named tcp_* only to sit with the L4/bootstrap area's plugins.) One module, two root ids:
 *
 * root_id "service" (a WasmService; singleton or per thread). Configuration lines:
 *   period <ms>      tick period (default 20)
 *   token <text>     on every tick, SharedData "service.token" = "<text>-<call body>" where
 *                    <call body> is the body of the last http_call answer ("" before one)
 *   cluster <name>   on the first tick, http_call GET /token to that cluster (authority "token")
 * It registers the shared queue "service.queue"; every item dequeued in proxy_on_queue_ready
 * is stored as SharedData "service.last_item". Counter metric service.configured counts
 * proxy_on_configure calls (one per instance), service.ticks the ticks.
 *
 * root_id "reader" (an HTTP filter on the same vm_id): request header x-enqueue: <item> is
 * enqueued to "service.queue" (resolved by the configured vm_id line "vm_id <id>"); response
 * headers get x-service-token / x-service-last-item (the SharedData values, or "none").
 */
#include "proxy_wasm.h"

#define TOKEN_KEY "service.token"
#define ITEM_KEY "service.last_item"
#define QUEUE "service.queue"

typedef struct {
  int is_service;
  char token[128];
  char cluster[64];
  char vm_id[64];
  char body[256];
  uint32_t queue_id;
  int called;
} root_state;

typedef struct {
  root_state *root;
} stream_state;

static uint32_t m_configured, m_ticks;

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (!parent) {
    pw_ctx_set(context_id, calloc(1, sizeof(root_state)));
    return;
  }
  stream_state *s = calloc(1, sizeof *s);
  s->root = pw_ctx_get(parent);
  pw_ctx_set(context_id, s);
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) {
  proxy_define_metric(PW_COUNTER, "service.configured", strlen("service.configured"), &m_configured);
  proxy_define_metric(PW_COUNTER, "service.ticks", strlen("service.ticks"), &m_ticks);
  return 1;
}

static void set_shared(const char *key, const char *value) {
  proxy_set_shared_data(key, strlen(key), value, strlen(value), 0);
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  pw_bytes root_name;
  const char path[] = "plugin_root_id";
  pw_get_property(path, sizeof path - 1, &root_name);
  r->is_service = !strcmp(root_name.data, "service");
  pw_bytes_free(&root_name);
  uint32_t period = 20;
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "period")) period = (uint32_t)atol(line);
    if (!strcmp(key, "token")) snprintf(r->token, sizeof r->token, "%s", line);
    if (!strcmp(key, "cluster")) snprintf(r->cluster, sizeof r->cluster, "%s", line);
    if (!strcmp(key, "vm_id")) snprintf(r->vm_id, sizeof r->vm_id, "%s", line);
  }
  pw_bytes_free(&config);
  if (!r->is_service) return 1;
  proxy_increment_metric(m_configured, 1);
  proxy_register_shared_queue(QUEUE, strlen(QUEUE), &r->queue_id);
  proxy_set_tick_period_milliseconds(period);
  return 1;
}

PW_EXPORT(proxy_on_tick) void on_tick(uint32_t root_id) {
  root_state *r = pw_ctx_get(root_id);
  proxy_increment_metric(m_ticks, 1);
  if (r->cluster[0] && !r->called) {
    r->called = 1;
    pw_pairs headers = {0};
    pw_pairs_add(&headers, ":method", 7, "GET", 3);
    pw_pairs_add(&headers, ":path", 5, "/token", 6);
    pw_pairs_add(&headers, ":authority", 10, "token", 5);
    pw_bytes h = pw_pairs_serialize(&headers);
    uint32_t token = 0;
    int32_t rc = proxy_http_call(r->cluster, strlen(r->cluster), h.data, h.len, NULL, 0, NULL, 0, 1000, &token);
    pw_bytes_free(&h);
    if (rc != PW_OK) pw_logf(PW_LOG_WARN, "service http_call failed: %d", rc);
  }
  char value[400];
  snprintf(value, sizeof value, "%s-%s", r->token, r->body);
  set_shared(TOKEN_KEY, value);
}

PW_EXPORT(proxy_on_http_call_response)
void on_http_call_response(uint32_t root_id, uint32_t token, uint32_t headers, uint32_t body_size, uint32_t trailers) {
  root_state *r = pw_ctx_get(root_id);
  pw_bytes body;
  pw_get_buffer(PW_HTTP_CALL_RESPONSE_BODY, 0, body_size, &body);
  snprintf(r->body, sizeof r->body, "%s", body.data);
  pw_bytes_free(&body);
}

PW_EXPORT(proxy_on_queue_ready) void on_queue_ready(uint32_t root_id, uint32_t queue_id) {
  for (int i = 0; i < 100; i++) {
    char *data = NULL;
    size_t n = 0;
    if (proxy_dequeue_shared_queue(queue_id, &data, &n) != PW_OK) return;
    pw_bytes item = pw_bytes_take(data, n);
    set_shared(ITEM_KEY, item.data);
    pw_bytes_free(&item);
  }
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes item;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-enqueue", &item) == PW_OK) {
    uint32_t id = 0;
    root_state *r = s->root;
    if (proxy_resolve_shared_queue(r->vm_id, strlen(r->vm_id), QUEUE, strlen(QUEUE), &id) == PW_OK)
      proxy_enqueue_shared_queue(id, item.data, item.len);
  }
  pw_bytes_free(&item);
  return PW_HEADERS_CONTINUE;
}

static void report(const char *key, const char *header) {
  char *data = NULL;
  size_t n = 0;
  uint32_t cas = 0;
  int32_t rc = proxy_get_shared_data(key, strlen(key), &data, &n, &cas);
  pw_bytes v = pw_bytes_take(rc == PW_OK ? data : NULL, n);
  pw_add_header(PW_RESPONSE_HEADERS, header, rc == PW_OK ? v.data : "none");
  pw_bytes_free(&v);
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  report(TOKEN_KEY, "x-service-token");
  report(ITEM_KEY, "x-service-last-item");
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) { free(pw_ctx_take(context_id)); }
