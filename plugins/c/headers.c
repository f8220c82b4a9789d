/*
 * headers: add / replace / remove / read request and response headers and trailers in any phase.
 *
 * Operations come from the plugin configuration (one per line) and from the request header
 * x-headers-ops (';'-separated, read in on_request_headers). Each operation is
 *   <phase> <op> <map> <name> [<value>]
 * phase: request_headers request_body request_trailers response_headers response_body
 *        response_trailers log      (body phases apply at end_of_stream only)
 * op:    add replace remove get size keys     (size and keys take no name)
 * map:   request_headers request_trailers response_headers response_trailers
 * get reports "x-get-<name>: <status>:<value>" (a pseudo-header's ':' is dropped from <name>), size reports "x-size-<map>: <status>:<size>:<pairs>",
 * keys reports "x-keys-<map>: <status>:<key>,<key>..." (in map order, from get_header_map_pairs),
 * and a failed add/replace/remove reports "x-status-<op>-<name>: <status>"; reports are added to
 * the response headers in on_response_headers (later ones are logged at info).
 * Built for ABI 0.2.1 (headers.wasm), 0.2.0 (headers_abi020.wasm) and 0.1.0 (headers_abi010.wasm).
 */
#include "proxy_wasm.h"

enum { P_REQUEST_HEADERS, P_REQUEST_BODY, P_REQUEST_TRAILERS, P_RESPONSE_HEADERS, P_RESPONSE_BODY,
       P_RESPONSE_TRAILERS, P_LOG, P_COUNT };
static const char *const phase_names[P_COUNT] = {"request_headers",  "request_body",  "request_trailers",
                                                 "response_headers", "response_body", "response_trailers",
                                                 "log"};

typedef struct op {
  int phase;
  const char *op;
  int32_t map;
  const char *name;
  const char *value;
  struct op *next;
} op;

typedef struct report {
  char *name;
  char *value;
  struct report *next;
} report;

typedef struct {
  int is_root;
  op *ops;
} root_state;

typedef struct {
  int is_root;
  root_state *root;
  char *ops_text;
  op *ops;
  report *reports;
  int reported; /* response headers done: later reports are logged */
} stream_state;

static int phase_by_name(const char *name) {
  for (int i = 0; i < P_COUNT; i++)
    if (!strcmp(name, phase_names[i])) return i;
  return -1;
}

/* Parses operations from text (kept alive: ops point into it); sep separates operations. */
static op *parse_ops(char *text, char sep) {
  op *head = NULL, **tail = &head;
  if (sep != '\n')
    for (char *c = text; *c; c++)
      if (*c == sep) *c = '\n';
  char *cursor = text, *line;
  while ((line = pw_next_line(&cursor))) {
    char *phase = pw_next_word(&line), *name_op = pw_next_word(&line), *map = pw_next_word(&line);
    char *name = pw_next_word(&line);
    op *o = calloc(1, sizeof *o);
    o->phase = phase_by_name(phase);
    o->op = name_op;
    o->map = pw_map_by_name(map);
    o->name = name;
    o->value = line;
    if (o->phase < 0 || o->map < 0) {
      pw_logf(PW_LOG_WARN, "headers: ignoring bad operation '%s %s %s'", phase, name_op, map);
      free(o);
      continue;
    }
    if (!strcmp(name_op, "size") || !strcmp(name_op, "keys")) o->name = map; /* x-size-<map>, x-keys-<map> */
    *tail = o;
    tail = &o->next;
  }
  return head;
}

static void add_report(stream_state *s, const char *name, const char *value) {
  if (s->reported) {
    pw_logf(PW_LOG_INFO, "headers: %s: %s", name, value);
    return;
  }
  report *r = calloc(1, sizeof *r), **tail = &s->reports;
  r->name = strdup(name);
  r->value = strdup(value);
  while (*tail) tail = &(*tail)->next;
  *tail = r; /* in operation order */
}

static void run_op(stream_state *s, const op *o) {
  char name[256], value[1024];
  int32_t rc;
  if (!strcmp(o->op, "get")) {
    pw_bytes v;
    rc = pw_get_header(o->map, o->name, &v);
    snprintf(name, sizeof name, "x-get-%s", o->name + (o->name[0] == ':')); /* ":path" -> x-get-path */
    snprintf(value, sizeof value, "%d:%s", rc, v.data);
    pw_bytes_free(&v);
    add_report(s, name, value);
    return;
  }
  if (!strcmp(o->op, "size")) {
    size_t size = 0, len = 0;
    char *pairs = NULL;
    rc = proxy_get_header_map_size(o->map, &size);
    pw_pairs p = {0};
    if (proxy_get_header_map_pairs(o->map, &pairs, &len) == PW_OK) pw_pairs_parse(pairs, len, &p);
    free(pairs);
    snprintf(name, sizeof name, "x-size-%s", o->name);
    snprintf(value, sizeof value, "%d:%zu:%zu", rc, size, p.n);
    add_report(s, name, value);
    return;
  }
  if (!strcmp(o->op, "keys")) {
    size_t len = 0, used = 0;
    char *pairs = NULL;
    pw_pairs p = {0};
    rc = proxy_get_header_map_pairs(o->map, &pairs, &len);
    if (rc == PW_OK) pw_pairs_parse(pairs, len, &p);
    snprintf(value, sizeof value, "%d:", rc);
    used = strlen(value);
    for (size_t i = 0; i < p.n && used + p.klen[i] + 2 < sizeof value; i++) {
      memcpy(value + used, p.key[i], p.klen[i]);
      used += p.klen[i];
      value[used++] = i + 1 < p.n ? ',' : 0;
    }
    value[used] = 0;
    free(pairs);
    snprintf(name, sizeof name, "x-keys-%s", o->name);
    add_report(s, name, value);
    return;
  }
  if (!strcmp(o->op, "add"))
    rc = pw_add_header(o->map, o->name, o->value);
  else if (!strcmp(o->op, "replace"))
    rc = pw_replace_header(o->map, o->name, o->value);
  else if (!strcmp(o->op, "remove"))
    rc = pw_remove_header(o->map, o->name);
  else
    rc = -1;
  if (rc != PW_OK) {
    snprintf(name, sizeof name, "x-status-%s-%s", o->op, o->name + (o->name[0] == ':'));
    snprintf(value, sizeof value, "%d", rc);
    add_report(s, name, value);
  }
}

static void run_phase(uint32_t context_id, int phase) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s) return;
  for (op *o = s->root ? s->root->ops : NULL; o; o = o->next)
    if (o->phase == phase) run_op(s, o);
  for (op *o = s->ops; o; o = o->next)
    if (o->phase == phase) run_op(s, o);
}

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (parent == 0) {
    root_state *r = calloc(1, sizeof *r);
    r->is_root = 1;
    pw_ctx_set(context_id, r);
    return;
  }
  stream_state *s = calloc(1, sizeof *s);
  s->root = pw_ctx_get(parent);
  pw_ctx_set(context_id, s);
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  pw_bytes config = pw_get_plugin_config(size);
  r->ops = parse_ops(config.data, '\n'); /* config.data stays alive: ops point into it */
  return 1;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  (void)headers;
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes ops;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-headers-ops", &ops) == PW_OK && ops.len) {
    s->ops_text = ops.data;
    s->ops = parse_ops(ops.data, ';');
  } else {
    pw_bytes_free(&ops);
  }
  run_phase(context_id, P_REQUEST_HEADERS);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_request_body) uint32_t on_request_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  (void)size;
  if (eos) run_phase(context_id, P_REQUEST_BODY);
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_request_trailers) uint32_t on_request_trailers(uint32_t context_id, uint32_t n) {
  (void)n;
  run_phase(context_id, P_REQUEST_TRAILERS);
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  (void)headers;
  run_phase(context_id, P_RESPONSE_HEADERS);
  stream_state *s = pw_ctx_get(context_id);
  if (s) {
    for (report *r = s->reports; r; r = r->next) pw_add_header(PW_RESPONSE_HEADERS, r->name, r->value);
    s->reported = 1;
  }
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_body) uint32_t on_response_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  (void)size;
  if (eos) run_phase(context_id, P_RESPONSE_BODY);
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_response_trailers) uint32_t on_response_trailers(uint32_t context_id, uint32_t n) {
  (void)n;
  run_phase(context_id, P_RESPONSE_TRAILERS);
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_log) void on_log(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (s) s->reported = 1;
  run_phase(context_id, P_LOG);
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) {
  (void)context_id;
  return 1;
}

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_take(context_id);
  if (!s || s->is_root) return; /* root states live as long as the VM */
  for (op *o = s->ops, *next; o; o = next) {
    next = o->next;
    free(o);
  }
  for (report *r = s->reports, *next; r; r = next) {
    next = r->next;
    free(r->name);
    free(r->value);
    free(r);
  }
  free(s->ops_text);
  free(s);
}
