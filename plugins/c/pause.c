/*
 * pause: stop in the request or response headers callback and resume later from
 * (a) a tick, (b) an http_call response, (c) a shared-queue item.
 *
 * Request headers:
 *   x-pause-request: tick | http_call | queue     pause on_request_headers
 *   x-pause-response: tick | http_call | queue    pause on_response_headers
 *   x-pause-enqueue: <item>                       enqueue <item> on the queue (this request is
 *                                                 not paused by it)
 * Plugin configuration lines (all optional):
 *   cluster <name>       http_call target (default "echo")
 *   tick_ms <n>          tick period while something waits for a tick (default 10)
 *   queue <name>         queue registered by the root context (default "pause_queue")
 * On resume the plugin adds to the paused direction's headers (request headers reach the
 * upstream, response headers the client):
 *   x-resumed-by: tick | http_call | queue
 *   x-callout-status: <:status of the callout>   x-callout-body: <callout body>   (http_call)
 *   x-queue-item: <item>                                                           (queue)
 * A queue waiter that finds an item already queued takes it without pausing
 * ("x-resumed-by: queue-immediate").
 * then calls proxy_continue_stream. If proxy_http_call fails, its status goes in
 * "x-http-call-status" and the stream is not paused. The callout is "GET /callout" with
 * "x-echo-body: callout-body" (the test echo server answers with that body).
 * The gauge "pause_waiting" counts streams currently paused (tests poll it in admin /stats).
 */
#include "proxy_wasm.h"

enum { WAIT_NONE, WAIT_TICK, WAIT_HTTP_CALL, WAIT_QUEUE };

typedef struct waiter {
  uint32_t context_id;
  int stream; /* PW_STREAM_REQUEST or PW_STREAM_RESPONSE */
  int kind;
  uint32_t token; /* http_call */
  struct waiter *next;
} waiter;

typedef struct {
  int is_root;
  char cluster[64];
  char queue[64];
  uint32_t tick_ms;
  uint32_t queue_id;
  waiter *waiting; /* FIFO */
} root_state;

typedef struct {
  int is_root;
  root_state *root;
  int pause_request, pause_response;
} stream_state;

static uint32_t waiting_gauge;

static int kind_by_name(const char *name) {
  if (!strcmp(name, "tick")) return WAIT_TICK;
  if (!strcmp(name, "http_call")) return WAIT_HTTP_CALL;
  if (!strcmp(name, "queue")) return WAIT_QUEUE;
  return WAIT_NONE;
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) {
  return proxy_define_metric(PW_GAUGE, "pause_waiting", 13, &waiting_gauge) == PW_OK;
}

PW_DEFINE_CONTEXT_CREATE(root_state, stream_state)

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  strcpy(r->cluster, "echo");
  strcpy(r->queue, "pause_queue");
  r->tick_ms = 10;
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "cluster"))
      snprintf(r->cluster, sizeof r->cluster, "%s", line);
    else if (!strcmp(key, "queue"))
      snprintf(r->queue, sizeof r->queue, "%s", line);
    else if (!strcmp(key, "tick_ms"))
      r->tick_ms = (uint32_t)atoi(line);
  }
  pw_bytes_free(&config);
  int32_t rc = proxy_register_shared_queue(r->queue, strlen(r->queue), &r->queue_id);
  pw_logf(PW_LOG_INFO, "pause: registered queue %s: status %d id %u", r->queue, rc, r->queue_id);
  return rc == PW_OK;
}

static int32_t map_for(int stream) { return stream == PW_STREAM_REQUEST ? PW_REQUEST_HEADERS : PW_RESPONSE_HEADERS; }

static void resume(waiter *w, const char *by) {
  proxy_set_effective_context(w->context_id);
  pw_add_header(map_for(w->stream), "x-resumed-by", by);
  int32_t rc = proxy_continue_stream(w->stream);
  proxy_increment_metric(waiting_gauge, -1);
  pw_logf(PW_LOG_INFO, "pause: resumed %u by %s: status %d", w->context_id, by, rc);
}

/* Unlinks and returns the first waiter matching kind (and token, for http_call), or NULL. */
static waiter *take_waiter(root_state *r, int kind, uint32_t token) {
  for (waiter **p = &r->waiting; *p; p = &(*p)->next) {
    if ((*p)->kind == kind && (kind != WAIT_HTTP_CALL || (*p)->token == token)) {
      waiter *w = *p;
      *p = w->next;
      return w;
    }
  }
  return NULL;
}

static int has_waiter(root_state *r, int kind) {
  for (waiter *w = r->waiting; w; w = w->next)
    if (w->kind == kind) return 1;
  return 0;
}

/* Pauses the stream: returns 1 if it is now waiting. */
static int pause_stream(uint32_t context_id, int stream, int kind) {
  stream_state *s = pw_ctx_get(context_id);
  root_state *r = s->root;
  waiter *w = calloc(1, sizeof *w);
  w->context_id = context_id;
  w->stream = stream;
  w->kind = kind;
  if (kind == WAIT_HTTP_CALL) {
    static const char body[] = "";
    pw_pairs hdrs = {0};
    pw_pairs_add(&hdrs, ":method", 7, "GET", 3);
    pw_pairs_add(&hdrs, ":path", 5, "/callout", 8);
    pw_pairs_add(&hdrs, ":authority", 10, "callout", 7);
    pw_pairs_add(&hdrs, "x-echo-body", 11, "callout-body", 12);
    pw_bytes wire = pw_pairs_serialize(&hdrs);
    int32_t rc = proxy_http_call(r->cluster, strlen(r->cluster), wire.data, wire.len, body, 0, NULL, 0, 5000,
                                 &w->token);
    pw_bytes_free(&wire);
    if (rc != PW_OK) {
      char status[16];
      snprintf(status, sizeof status, "%d", rc);
      pw_add_header(map_for(stream), "x-http-call-status", status);
      free(w);
      return 0;
    }
  } else if (kind == WAIT_TICK) {
    proxy_set_tick_period_milliseconds(r->tick_ms);
  } else if (kind == WAIT_QUEUE) {
    /* An item enqueued while nobody waited is taken at once. */
    char *item = NULL;
    size_t len = 0;
    if (proxy_dequeue_shared_queue(r->queue_id, &item, &len) == PW_OK) {
      pw_bytes b = pw_bytes_take(item, len);
      pw_add_header(map_for(stream), "x-queue-item", b.data);
      pw_add_header(map_for(stream), "x-resumed-by", "queue-immediate");
      pw_bytes_free(&b);
      free(w);
      return 0;
    }
  }
  /* Append: waiters resume in arrival order. */
  waiter **tail = &r->waiting;
  while (*tail) tail = &(*tail)->next;
  *tail = w;
  proxy_increment_metric(waiting_gauge, 1);
  return 1;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes v;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-pause-enqueue", &v) == PW_OK) {
    int32_t rc = proxy_enqueue_shared_queue(s->root->queue_id, v.data, v.len);
    pw_logf(PW_LOG_INFO, "pause: enqueued '%s': status %d", v.data, rc);
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-pause-response", &v) == PW_OK) s->pause_response = kind_by_name(v.data);
  pw_bytes_free(&v);
  pw_get_header(PW_REQUEST_HEADERS, "x-pause-request", &v);
  s->pause_request = kind_by_name(v.data);
  pw_bytes_free(&v);
  if (s->pause_request && pause_stream(context_id, PW_STREAM_REQUEST, s->pause_request))
    return PW_HEADERS_STOP_ITERATION;
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  if (s && s->pause_response && pause_stream(context_id, PW_STREAM_RESPONSE, s->pause_response))
    return PW_HEADERS_STOP_ITERATION;
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_tick) void on_tick(uint32_t root_id) {
  root_state *r = pw_ctx_get(root_id);
  waiter *w;
  while ((w = take_waiter(r, WAIT_TICK, 0))) {
    resume(w, "tick");
    free(w);
  }
  proxy_set_tick_period_milliseconds(0);
}

PW_EXPORT(proxy_on_http_call_response)
void on_http_call_response(uint32_t context_id, uint32_t token, uint32_t headers, uint32_t body_size,
                           uint32_t trailers) {
  /* The callback may arrive on the root or the calling context: find the waiter by token. */
  root_state *r = NULL;
  for (pw_ctx_entry *e = pw_ctx_list; e && !r; e = e->next) {
    root_state *candidate = e->state;
    if (candidate->is_root) {
      waiter *w = take_waiter(candidate, WAIT_HTTP_CALL, token);
      if (w) {
        pw_bytes status, body;
        pw_get_header(PW_HTTP_CALL_RESPONSE_HEADERS, ":status", &status);
        pw_get_buffer(PW_HTTP_CALL_RESPONSE_BODY, 0, body_size, &body);
        proxy_set_effective_context(w->context_id);
        pw_add_header(map_for(w->stream), "x-callout-status", status.data);
        pw_add_header(map_for(w->stream), "x-callout-body", body.data);
        pw_bytes_free(&status);
        pw_bytes_free(&body);
        resume(w, "http_call");
        free(w);
        return;
      }
    }
  }
  pw_logf(PW_LOG_WARN, "pause: http_call response for unknown token %u", token);
}

PW_EXPORT(proxy_on_queue_ready) void on_queue_ready(uint32_t root_id, uint32_t queue_id) {
  root_state *r = pw_ctx_get(root_id);
  while (has_waiter(r, WAIT_QUEUE)) {
    char *item = NULL;
    size_t len = 0;
    if (proxy_dequeue_shared_queue(queue_id, &item, &len) != PW_OK) break;
    pw_bytes b = pw_bytes_take(item, len);
    waiter *w = take_waiter(r, WAIT_QUEUE, 0);
    proxy_set_effective_context(w->context_id);
    pw_add_header(map_for(w->stream), "x-queue-item", b.data);
    pw_bytes_free(&b);
    resume(w, "queue");
    free(w);
  }
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return;
  pw_ctx_take(context_id);
  /* A stream that goes away while paused (client reset) stops waiting. */
  waiter **p = &s->root->waiting;
  while (*p) {
    if ((*p)->context_id == context_id) {
      waiter *w = *p;
      *p = w->next;
      free(w);
      proxy_increment_metric(waiting_gauge, -1);
    } else {
      p = &(*p)->next;
    }
  }
  free(s);
}
