/*
 * grpc_callout: gRPC callouts from on_request_headers (proxy_grpc_call / proxy_grpc_stream),
 * answered with a local reply that records everything the plugin saw.
 *
 * Plugin configuration lines (all optional):
 *   cluster <name>        target cluster (default "grpc")
 *   upstream proto|name|google   the upstream argument: a serialized
 *                         GrpcService{envoy_grpc{cluster_name}} (default), the bare cluster name,
 *                         or GrpcService{google_grpc{target_uri: <cluster>, stat_prefix}}
 *   timeout_ms <n>        unary call timeout (default 5000)
 * Request headers:
 *   x-grpc-mode: call | stream          absent: the request passes untouched
 *   x-grpc-cluster / x-grpc-upstream    override the configuration for this request
 *   x-grpc-service, x-grpc-method       default "test.Echo" and "Unary" (call) / "Stream"
 *   x-grpc-message                      call: the request message; stream: messages separated
 *                                       by ',' each sent with proxy_grpc_send
 *   x-grpc-timeout-ms                   call timeout override
 *   x-grpc-metadata: k=v[,k=v]          initial metadata of the callout
 *   x-grpc-then: (call)   close | cancel       proxy_grpc_close / proxy_grpc_cancel right away
 *                (stream) close | end | cancel | none   after the sends: proxy_grpc_close,
 *                                       end_stream on the last send, proxy_grpc_cancel, nothing
 *   x-grpc-cancel-on-receive: 1         (stream) proxy_grpc_cancel after the first message
 * The reply (200, details "grpc_callout") has body lines, one per event, in order:
 *   call rc=<r>  |  stream rc=<r>  |  send rc=<r>  |  close rc=<r>  |  cancel rc=<r>
 *   initial_metadata n=<elements> <k>=<v>;...     trailing_metadata n=<elements> <k>=<v>;...
 *   receive size=<n> <message>
 *   grpc_close status=<code> get_status=<code> message=<proxy_get_status message>
 * and the headers x-grpc-token-kind: odd | even | none (call tokens are odd, stream tokens even;
 * none: the callout did not start) and x-grpc-token: <token> (0 when it did not start).
 * The stream ends (the reply is sent) when the callout is over: a unary receive or close, a
 * stream's close, or a cancel / failed start. Events for a token nobody waits for are logged
 * ("grpc_callout: late <event> token <t>").
 */
#include "proxy_wasm.h"

#define LOG_MAX 8192

typedef struct call_state {
  uint32_t context_id;
  uint32_t token;
  int is_stream;
  int cancel_on_receive;
  char log[LOG_MAX];
  size_t log_len;
  struct call_state *next;
} call_state;

typedef struct {
  int is_root;
  char cluster[128];
  char upstream[8]; /* "proto", "name" or "google" */
  uint32_t timeout_ms;
  call_state *calls;
} root_state;

typedef struct {
  int is_root;
  root_state *root;
  call_state *call; /* while waiting */
} stream_state;

static void note(call_state *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(c->log + c->log_len, LOG_MAX - c->log_len, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  c->log_len += (size_t)n < LOG_MAX - c->log_len ? (size_t)n : LOG_MAX - c->log_len - 1;
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) { return 1; }

PW_DEFINE_CONTEXT_CREATE(root_state, stream_state)

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  strcpy(r->cluster, "grpc");
  strcpy(r->upstream, "proto");
  r->timeout_ms = 5000;
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "cluster"))
      snprintf(r->cluster, sizeof r->cluster, "%s", line);
    else if (!strcmp(key, "upstream"))
      snprintf(r->upstream, sizeof r->upstream, "%s", line);
    else if (!strcmp(key, "timeout_ms"))
      r->timeout_ms = (uint32_t)atoi(line);
  }
  pw_bytes_free(&config);
  return 1;
}

/* The upstream argument: a GrpcService built by hand (envoy_grpc{cluster_name} or
 * google_grpc{target_uri, stat_prefix}), or the bare name. */
static size_t upstream_bytes(const char *cluster, const char *kind, char *out, size_t cap) {
  size_t n = strlen(cluster);
  if (!strcmp(kind, "name") || n > 100 || n + 20 > cap) {
    memcpy(out, cluster, n);
    return n;
  }
  if (!strcmp(kind, "google")) {
    static const char prefix[] = "grpc_callout";
    size_t p = sizeof prefix - 1;
    out[0] = 0x12; /* field 2 (google_grpc), length-delimited */
    out[1] = (char)(n + 2 + p + 2);
    out[2] = 0x0a; /* GoogleGrpc field 1 (target_uri) */
    out[3] = (char)n;
    memcpy(out + 4, cluster, n);
    out[4 + n] = 0x22; /* GoogleGrpc field 4 (stat_prefix) */
    out[5 + n] = (char)p;
    memcpy(out + 6 + n, prefix, p);
    return n + 6 + p;
  }
  out[0] = 0x0a; /* field 1 (envoy_grpc), length-delimited */
  out[1] = (char)(n + 2);
  out[2] = 0x0a; /* EnvoyGrpc field 1 (cluster_name) */
  out[3] = (char)n;
  memcpy(out + 4, cluster, n);
  return n + 4;
}

static call_state *find_call(root_state *r, uint32_t token, int unlink) {
  for (call_state **p = &r->calls; *p; p = &(*p)->next) {
    if ((*p)->token == token) {
      call_state *c = *p;
      if (unlink) *p = c->next;
      return c;
    }
  }
  return NULL;
}

/* Sends the local reply with the event log and forgets the call. */
static void finish(root_state *r, call_state *c) {
  find_call(r, c->token, 1);
  proxy_set_effective_context(c->context_id);
  stream_state *s = pw_ctx_get(c->context_id);
  if (s) s->call = NULL;
  pw_pairs hdrs = {0};
  const char *kind = c->token == 0 ? "none" : (c->token & 1) ? "odd" : "even";
  char token[16];
  snprintf(token, sizeof token, "%u", c->token);
  pw_pairs_add(&hdrs, "x-grpc-token-kind", 17, kind, strlen(kind));
  pw_pairs_add(&hdrs, "x-grpc-token", 12, token, strlen(token));
  pw_bytes wire = pw_pairs_serialize(&hdrs);
  proxy_send_local_response(200, "grpc_callout", 12, c->log, c->log_len, wire.data, wire.len, -1);
  pw_bytes_free(&wire);
  free(c);
}

/* Copies header value h (or dflt) into buf. */
static void header_or(const char *name, const char *dflt, char *buf, size_t cap) {
  pw_bytes v;
  if (pw_get_header(PW_REQUEST_HEADERS, name, &v) == PW_OK)
    snprintf(buf, cap, "%s", v.data);
  else
    snprintf(buf, cap, "%s", dflt);
  pw_bytes_free(&v);
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  root_state *r = s->root;
  char mode[16], cluster[128], upstream_kind[16], service[128], method[128], message[1024], md[512], then[16],
      timeout[16], cancel_rx[4];
  header_or("x-grpc-mode", "", mode, sizeof mode);
  int is_stream = !strcmp(mode, "stream");
  if (!is_stream && strcmp(mode, "call")) return PW_HEADERS_CONTINUE;
  header_or("x-grpc-cluster", r->cluster, cluster, sizeof cluster);
  header_or("x-grpc-upstream", r->upstream, upstream_kind, sizeof upstream_kind);
  header_or("x-grpc-service", "test.Echo", service, sizeof service);
  header_or("x-grpc-method", is_stream ? "Stream" : "Unary", method, sizeof method);
  header_or("x-grpc-message", "", message, sizeof message);
  header_or("x-grpc-metadata", "", md, sizeof md);
  header_or("x-grpc-then", "", then, sizeof then);
  header_or("x-grpc-timeout-ms", "", timeout, sizeof timeout);
  header_or("x-grpc-cancel-on-receive", "", cancel_rx, sizeof cancel_rx);

  char upstream[256];
  size_t ulen = upstream_bytes(cluster, upstream_kind, upstream, sizeof upstream);
  /* Initial metadata pairs point into md (split in place). */
  pw_pairs pairs = {0};
  for (char *item = md; *item;) {
    char *end = strchr(item, ',');
    if (end) *end = 0;
    char *eq = strchr(item, '=');
    if (eq) {
      *eq = 0;
      pw_pairs_add(&pairs, item, strlen(item), eq + 1, strlen(eq + 1));
    }
    if (!end) break;
    item = end + 1;
  }
  pw_bytes wire = pw_pairs_serialize(&pairs);

  call_state *c = calloc(1, sizeof *c);
  c->context_id = context_id;
  c->is_stream = is_stream;
  c->cancel_on_receive = cancel_rx[0] == '1';
  int32_t rc;
  if (!is_stream) {
    uint32_t timeout_ms = timeout[0] ? (uint32_t)atoi(timeout) : r->timeout_ms;
    rc = proxy_grpc_call(upstream, ulen, service, strlen(service), method, strlen(method), wire.data, wire.len,
                         message, strlen(message), timeout_ms, &c->token);
    note(c, "call rc=%d\n", rc);
  } else {
    rc = proxy_grpc_stream(upstream, ulen, service, strlen(service), method, strlen(method), wire.data, wire.len,
                           &c->token);
    note(c, "stream rc=%d\n", rc);
  }
  pw_bytes_free(&wire);
  c->next = r->calls;
  r->calls = c;
  if (rc != PW_OK) {
    c->token = 0;
    finish(r, c);
    return PW_HEADERS_STOP_ITERATION;
  }
  s->call = c;
  uint32_t token = c->token;
  if (is_stream) {
    int end_on_last = !strcmp(then, "end");
    for (char *item = message; *item;) {
      char *end = strchr(item, ',');
      if (end) *end = 0;
      int32_t src = proxy_grpc_send(token, item, strlen(item), end_on_last && !end);
      note(c, "send rc=%d\n", src);
      if (!end) break;
      item = end + 1;
    }
  }
  if (!strcmp(then, "close")) {
    note(c, "close rc=%d\n", proxy_grpc_close(token));
    if (!is_stream) finish(r, c);
  } else if (!strcmp(then, "cancel")) {
    note(c, "cancel rc=%d\n", proxy_grpc_cancel(token));
    finish(r, c);
  }
  return PW_HEADERS_STOP_ITERATION;
}

static void note_metadata(call_state *c, const char *what, int32_t map, uint32_t elements) {
  char *data = NULL;
  size_t len = 0;
  int32_t rc = proxy_get_header_map_pairs(map, &data, &len);
  pw_bytes raw = pw_bytes_take(rc == PW_OK ? data : NULL, len);
  pw_pairs pairs;
  note(c, "%s n=%u", what, elements);
  if (pw_pairs_parse(raw.data, raw.len, &pairs)) {
    for (size_t i = 0; i < pairs.n; i++)
      note(c, "%s%.*s=%.*s", i ? ";" : " ", (int)pairs.klen[i], pairs.key[i], (int)pairs.vlen[i], pairs.val[i]);
  }
  note(c, "\n");
  pw_bytes_free(&raw);
}

static root_state *root_of(uint32_t context_id) {
  root_state *r = pw_ctx_get(context_id);
  return r && r->is_root ? r : NULL;
}

PW_EXPORT(proxy_on_grpc_receive_initial_metadata)
void on_grpc_receive_initial_metadata(uint32_t context_id, uint32_t token, uint32_t elements) {
  root_state *r = root_of(context_id);
  call_state *c = r ? find_call(r, token, 0) : NULL;
  if (!c) {
    pw_logf(PW_LOG_WARN, "grpc_callout: late initial_metadata token %u", token);
    return;
  }
  note_metadata(c, "initial_metadata", PW_GRPC_RECEIVE_INITIAL_METADATA, elements);
}

PW_EXPORT(proxy_on_grpc_receive_trailing_metadata)
void on_grpc_receive_trailing_metadata(uint32_t context_id, uint32_t token, uint32_t elements) {
  root_state *r = root_of(context_id);
  call_state *c = r ? find_call(r, token, 0) : NULL;
  if (!c) {
    pw_logf(PW_LOG_WARN, "grpc_callout: late trailing_metadata token %u", token);
    return;
  }
  note_metadata(c, "trailing_metadata", PW_GRPC_RECEIVE_TRAILING_METADATA, elements);
}

PW_EXPORT(proxy_on_grpc_receive) void on_grpc_receive(uint32_t context_id, uint32_t token, uint32_t size) {
  root_state *r = root_of(context_id);
  call_state *c = r ? find_call(r, token, 0) : NULL;
  if (!c) {
    pw_logf(PW_LOG_WARN, "grpc_callout: late receive token %u", token);
    return;
  }
  pw_bytes msg;
  pw_get_buffer(PW_GRPC_RECEIVE_BUFFER, 0, size, &msg);
  note(c, "receive size=%u %s\n", size, msg.data);
  pw_bytes_free(&msg);
  if (!c->is_stream) {
    finish(r, c);
  } else if (c->cancel_on_receive) {
    note(c, "cancel rc=%d\n", proxy_grpc_cancel(token));
    finish(r, c);
  }
}

PW_EXPORT(proxy_on_grpc_close) void on_grpc_close(uint32_t context_id, uint32_t token, uint32_t status) {
  root_state *r = root_of(context_id);
  call_state *c = r ? find_call(r, token, 0) : NULL;
  uint32_t code = 0;
  char *msg = NULL;
  size_t len = 0;
  proxy_get_status(&code, &msg, &len);
  pw_bytes m = pw_bytes_take(msg, len);
  if (!c) {
    pw_logf(PW_LOG_WARN, "grpc_callout: late close token %u status %u message %s", token, status, m.data);
    pw_bytes_free(&m);
    return;
  }
  note(c, "grpc_close status=%u get_status=%u message=%s\n", status, code, m.data);
  pw_bytes_free(&m);
  if (c->is_stream) note(c, "close rc=%d\n", proxy_grpc_close(token));
  finish(r, c);
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return;
  pw_ctx_take(context_id);
  if (s->call) {
    /* The client went away while waiting: cancel the callout. */
    call_state *c = find_call(s->root, s->call->token, 1);
    if (c) {
      proxy_grpc_cancel(c->token);
      free(c);
    }
  }
  free(s);
}
