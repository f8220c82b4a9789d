/*
 * body: buffer and rewrite request and response bodies.
 *
 * Directives come from the plugin configuration (one per line) and from the request header
 * x-body-ops (';'-separated); each is "<request|response> <directive> [args]":
 *   buffer                 return StopIterationAndBuffer until end_of_stream, then apply the ops
 *                          once to the whole body (default mode: "stream", ops on every chunk)
 *   replace <text>         set_buffer_bytes(0, <current size>, text)
 *   append <text>          set_buffer_bytes(<current size>, 0, text)
 *   prepend <text>         set_buffer_bytes(0, 0, text)
 *   set <start> <size> <text>   set_buffer_bytes(start, size, text) as given
 *   upper                  read the whole buffer, upper-case it, write it back over itself
 *   get <start> <max>      get_buffer_bytes(start, max): request side reports it (see below)
 * When a direction has rewriting ops, its content-length header is removed in the headers
 * callback (as real plugins must) so the new length is framed by the proxy.
 * Request-side observations go into response headers:
 *   x-body-request-sizes     body_size argument of every on_request_body call, comma-separated
 *   x-body-request-eos       end_of_stream flags of those calls ("0,1")
 *   x-body-request-status    status of every set_buffer_bytes call, comma-separated
 *   x-body-request-get       "<status>:<bytes>" of the last get
 */
#include "proxy_wasm.h"

enum { REQ = 0, RESP = 1 };

typedef struct op {
  int dir;
  char *name;
  char *args;
  struct op *next;
} op;

typedef struct {
  int is_root;
  op *ops;
} root_state;

typedef struct {
  int is_root;
  root_state *root;
  char *text; /* x-body-ops; ops point into it */
  op *ops;
  char sizes[256], eos[128], status[256], get[512];
} stream_state;

static op *parse_ops(char *text, char sep) {
  op *head = NULL, **tail = &head;
  for (char *c = text; sep != '\n' && *c; c++)
    if (*c == sep) *c = '\n';
  char *cursor = text, *line;
  while ((line = pw_next_line(&cursor))) {
    char *dir = pw_next_word(&line);
    char *name = pw_next_word(&line);
    if (strcmp(dir, "request") && strcmp(dir, "response")) {
      pw_logf(PW_LOG_WARN, "body: ignoring directive for '%s'", dir);
      continue;
    }
    op *o = calloc(1, sizeof *o);
    o->dir = strcmp(dir, "request") == 0 ? REQ : RESP;
    o->name = name;
    o->args = line;
    *tail = o;
    tail = &o->next;
  }
  return head;
}

PW_DEFINE_CONTEXT_CREATE(root_state, stream_state)

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *r = pw_ctx_get(root_id);
  pw_bytes config = pw_get_plugin_config(size);
  r->ops = parse_ops(config.data, '\n'); /* config.data stays alive: ops point into it */
  return 1;
}

/* Iterates over the ops of direction dir: the plugin's, then the request's. */
#define FOR_OPS(s, o, dir)                                                                        \
  for (int list_ = 0; list_ < 2; list_++)                                                         \
    for (op *o = list_ == 0 ? ((s)->root ? (s)->root->ops : NULL) : (s)->ops; o; o = o->next)   \
      if (o->dir == (dir))

static int has(stream_state *s, int dir, const char *name) {
  FOR_OPS(s, o, dir) if (!strcmp(o->name, name)) return 1;
  return 0;
}

static int rewrites(stream_state *s, int dir) {
  FOR_OPS(s, o, dir) if (strcmp(o->name, "buffer") && strcmp(o->name, "stream") && strcmp(o->name, "get")) return 1;
  return 0;
}

/* Appends v to a comma-separated list. */
static void append_num(char *list, size_t cap, long v) {
  size_t n = strlen(list);
  snprintf(list + n, cap - n, n ? ",%ld" : "%ld", v);
}

static void apply(stream_state *s, int dir, size_t size) {
  int32_t type = dir == REQ ? PW_REQUEST_BODY : PW_RESPONSE_BODY;
  FOR_OPS(s, o, dir) {
    int32_t rc = -1;
    const char *a = o->args;
    if (!strcmp(o->name, "replace")) {
      rc = proxy_set_buffer_bytes(type, 0, size, a, strlen(a));
    } else if (!strcmp(o->name, "append")) {
      rc = proxy_set_buffer_bytes(type, size, 0, a, strlen(a));
    } else if (!strcmp(o->name, "prepend")) {
      rc = proxy_set_buffer_bytes(type, 0, 0, a, strlen(a));
    } else if (!strcmp(o->name, "set")) {
      char *copy = strdup(a), *rest = copy;
      size_t start = strtoul(pw_next_word(&rest), NULL, 10), len = strtoul(pw_next_word(&rest), NULL, 10);
      rc = proxy_set_buffer_bytes(type, start, len, rest, strlen(rest));
      free(copy);
    } else if (!strcmp(o->name, "upper")) {
      pw_bytes b;
      rc = pw_get_buffer(type, 0, size, &b);
      if (rc == PW_OK) {
        for (size_t i = 0; i < b.len; i++)
          if (b.data[i] >= 'a' && b.data[i] <= 'z') b.data[i] -= 32;
        rc = proxy_set_buffer_bytes(type, 0, b.len, b.data, b.len);
      }
      pw_bytes_free(&b);
    } else if (!strcmp(o->name, "get")) {
      char *copy = strdup(a), *rest = copy;
      size_t start = strtoul(pw_next_word(&rest), NULL, 10), max = strtoul(pw_next_word(&rest), NULL, 10);
      free(copy);
      pw_bytes b;
      int32_t grc = pw_get_buffer(type, start, max, &b);
      if (dir == REQ) snprintf(s->get, sizeof s->get, "%d:%s", grc, b.data);
      pw_bytes_free(&b);
      continue;
    } else {
      continue; /* buffer / stream */
    }
    if (dir == REQ) append_num(s->status, sizeof s->status, rc);
  }
}

static uint32_t on_headers(uint32_t context_id, int dir) {
  stream_state *s = pw_ctx_get(context_id);
  if (dir == REQ) {
    pw_bytes text;
    if (pw_get_header(PW_REQUEST_HEADERS, "x-body-ops", &text) == PW_OK && text.len) {
      s->text = text.data;
      s->ops = parse_ops(s->text, ';');
    } else {
      pw_bytes_free(&text);
    }
  }
  if (rewrites(s, dir)) pw_remove_header(dir == REQ ? PW_REQUEST_HEADERS : PW_RESPONSE_HEADERS, "content-length");
  return PW_HEADERS_CONTINUE;
}

static uint32_t on_body(uint32_t context_id, uint32_t size, uint32_t eos, int dir) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s) return PW_DATA_CONTINUE;
  if (dir == REQ) {
    append_num(s->sizes, sizeof s->sizes, (long)size);
    append_num(s->eos, sizeof s->eos, (long)eos);
  }
  if (has(s, dir, "buffer") && !eos) return PW_DATA_STOP_ITERATION_AND_BUFFER;
  apply(s, dir, size);
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  return on_headers(context_id, REQ);
}

PW_EXPORT(proxy_on_request_body) uint32_t on_request_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  return on_body(context_id, size, eos, REQ);
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  if (s->sizes[0]) pw_add_header(PW_RESPONSE_HEADERS, "x-body-request-sizes", s->sizes);
  if (s->eos[0]) pw_add_header(PW_RESPONSE_HEADERS, "x-body-request-eos", s->eos);
  if (s->status[0]) pw_add_header(PW_RESPONSE_HEADERS, "x-body-request-status", s->status);
  if (s->get[0]) pw_add_header(PW_RESPONSE_HEADERS, "x-body-request-get", s->get);
  return on_headers(context_id, RESP);
}

PW_EXPORT(proxy_on_response_body) uint32_t on_response_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  return on_body(context_id, size, eos, RESP);
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return;
  pw_ctx_take(context_id);
  for (op *o = s->ops, *next; o; o = next) {
    next = o->next;
    free(o);
  }
  free(s->text);
  free(s);
}
