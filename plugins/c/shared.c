/*
 * shared: SharedData (with compare-and-swap) and shared queues.
 *
 * Every request increments the shared counter "shared.counter" with a get + CAS-set retry loop
 * (at most 100 tries) in on_request_headers and reports in the response headers:
 *   x-shared-counter: <value after the increment>     x-shared-retries: <CAS mismatches seen>
 * Request headers (each optional) and their response-header reports:
 *   x-shared-get: <key>                   x-shared-get-result: <status>:<cas>:<value>
 *   x-shared-set: <key>=<value>           x-shared-set-status: <status>
 *   x-shared-set-cas: <cas>               (cas for that set; default 0 = unconditional)
 *   x-shared-enqueue: <item>              x-shared-enqueue-status: <resolve status>:<enqueue status>
 *                                         (resolves the configured queue by vm_id and name)
 *   x-shared-resolve: <vm_id>/<name>      x-shared-resolve-status: <status>
 *   x-shared-dequeue: any                 x-shared-dequeue-result: <status>:<item>
 * Plugin configuration lines: "queue <name>" (default "shared_queue") and "vm_id <id>" (the
 * vm_id used to resolve it, default ""). The root context registers the queue in
 * on_configure; on_queue_ready dequeues every item and appends it to the shared-data key
 * "shared.queue.log" (comma-separated), which x-shared-get can read.
 */
#include "proxy_wasm.h"

#define COUNTER_KEY "shared.counter"
#define LOG_KEY "shared.queue.log"

typedef struct {
  int is_root;
  char queue[64];
  char vm_id[64];
  uint32_t queue_id;
} root_state;

typedef struct report {
  char name[48];
  char value[512];
  struct report *next;
} report;

typedef struct {
  int is_root;
  root_state *root;
  report *reports;
} stream_state;

PW_DEFINE_CONTEXT_CREATE(root_state, stream_state)

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  strcpy(r->queue, "shared_queue");
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "queue")) snprintf(r->queue, sizeof r->queue, "%s", line);
    if (!strcmp(key, "vm_id")) snprintf(r->vm_id, sizeof r->vm_id, "%s", line);
  }
  pw_bytes_free(&config);
  return proxy_register_shared_queue(r->queue, strlen(r->queue), &r->queue_id) == PW_OK;
}

static void add_report(stream_state *s, const char *name, const char *fmt, ...) {
  report *r = calloc(1, sizeof *r), **tail = &s->reports;
  snprintf(r->name, sizeof r->name, "%s", name);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->value, sizeof r->value, fmt, ap);
  va_end(ap);
  while (*tail) tail = &(*tail)->next;
  *tail = r;
}

/* get + set(cas) until the set wins; returns the new value, *retries counts CAS mismatches. */
static long increment_counter(int *retries) {
  for (*retries = 0; *retries < 100; (*retries)++) {
    char *v = NULL;
    size_t n = 0;
    uint32_t cas = 0;
    long value = 0;
    int32_t rc = proxy_get_shared_data(COUNTER_KEY, strlen(COUNTER_KEY), &v, &n, &cas);
    if (rc == PW_OK) {
      pw_bytes b = pw_bytes_take(v, n);
      value = atol(b.data);
      pw_bytes_free(&b);
    } else if (rc != PW_NOT_FOUND) {
      return -rc;
    }
    char text[24];
    snprintf(text, sizeof text, "%ld", value + 1);
    rc = proxy_set_shared_data(COUNTER_KEY, strlen(COUNTER_KEY), text, strlen(text), cas);
    if (rc == PW_OK) return value + 1;
    if (rc != PW_CAS_MISMATCH) return -rc;
  }
  return -1;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  int retries;
  long value = increment_counter(&retries);
  add_report(s, "x-shared-counter", "%ld", value);
  add_report(s, "x-shared-retries", "%d", retries);

  pw_bytes v;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-get", &v) == PW_OK) {
    char *data = NULL;
    size_t n = 0;
    uint32_t cas = 0;
    int32_t rc = proxy_get_shared_data(v.data, v.len, &data, &n, &cas);
    pw_bytes b = pw_bytes_take(rc == PW_OK ? data : NULL, n);
    add_report(s, "x-shared-get-result", "%d:%u:%s", rc, cas, b.data);
    pw_bytes_free(&b);
  }
  pw_bytes_free(&v);

  if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-set", &v) == PW_OK) {
    pw_bytes cas_text;
    uint32_t cas = 0;
    if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-set-cas", &cas_text) == PW_OK) cas = (uint32_t)atol(cas_text.data);
    pw_bytes_free(&cas_text);
    char *eq = strchr(v.data, '=');
    const char *value_text = eq ? eq + 1 : "";
    size_t klen = eq ? (size_t)(eq - v.data) : v.len;
    add_report(s, "x-shared-set-status", "%d",
               proxy_set_shared_data(v.data, klen, value_text, strlen(value_text), cas));
  }
  pw_bytes_free(&v);

  if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-enqueue", &v) == PW_OK) {
    uint32_t id = 0;
    root_state *r = s->root;
    int32_t rrc = proxy_resolve_shared_queue(r->vm_id, strlen(r->vm_id), r->queue, strlen(r->queue), &id);
    int32_t erc = rrc == PW_OK ? proxy_enqueue_shared_queue(id, v.data, v.len) : -1;
    add_report(s, "x-shared-enqueue-status", "%d:%d", rrc, erc);
  }
  pw_bytes_free(&v);

  if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-resolve", &v) == PW_OK) {
    char *slash = strchr(v.data, '/');
    uint32_t id = 0;
    int32_t rc = slash ? proxy_resolve_shared_queue(v.data, (size_t)(slash - v.data), slash + 1, strlen(slash + 1), &id)
                       : PW_BAD_ARGUMENT;
    add_report(s, "x-shared-resolve-status", "%d", rc);
  }
  pw_bytes_free(&v);

  if (pw_get_header(PW_REQUEST_HEADERS, "x-shared-dequeue", &v) == PW_OK) {
    char *data = NULL;
    size_t n = 0;
    int32_t rc = proxy_dequeue_shared_queue(s->root->queue_id, &data, &n);
    pw_bytes b = pw_bytes_take(rc == PW_OK ? data : NULL, n);
    add_report(s, "x-shared-dequeue-result", "%d:%s", rc, b.data);
    pw_bytes_free(&b);
  }
  pw_bytes_free(&v);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  for (report *r = s ? s->reports : NULL; r; r = r->next) pw_add_header(PW_RESPONSE_HEADERS, r->name, r->value);
  return PW_HEADERS_CONTINUE;
}

/* Appends item to the shared queue log (CAS loop, like the counter). */
static void log_item(const pw_bytes *item) {
  for (int tries = 0; tries < 100; tries++) {
    char *v = NULL;
    size_t n = 0;
    uint32_t cas = 0;
    int32_t rc = proxy_get_shared_data(LOG_KEY, strlen(LOG_KEY), &v, &n, &cas);
    pw_bytes old = pw_bytes_take(rc == PW_OK ? v : NULL, n);
    size_t len = old.len + item->len + 2;
    char *next = malloc(len);
    snprintf(next, len, "%s%s%s", old.data, old.len ? "," : "", item->data);
    rc = proxy_set_shared_data(LOG_KEY, strlen(LOG_KEY), next, strlen(next), cas);
    free(next);
    pw_bytes_free(&old);
    if (rc != PW_CAS_MISMATCH) return;
  }
}

PW_EXPORT(proxy_on_queue_ready) void on_queue_ready(uint32_t root_id, uint32_t queue_id) {
  for (int i = 0; i < 1000; i++) {
    char *data = NULL;
    size_t n = 0;
    if (proxy_dequeue_shared_queue(queue_id, &data, &n) != PW_OK) return;
    pw_bytes item = pw_bytes_take(data, n);
    log_item(&item);
    pw_bytes_free(&item);
  }
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return;
  pw_ctx_take(context_id);
  for (report *r = s->reports, *next; r; r = next) {
    next = r->next;
    free(r);
  }
  free(s);
}
