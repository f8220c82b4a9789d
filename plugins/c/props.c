/*
 * props: read and write properties (proxy_get_property / proxy_set_property).
 *
 * Request headers:
 *   x-props-get: <path>[,<path>...]            read in on_request_headers
 *   x-props-get-response: <path>[,<path>...]   read in on_response_headers
 *   x-props-set: <path>=<value>                set_property in on_request_headers (before the gets)
 *   x-props-format: hex                        always report values in hex
 * A path's segments are separated by '.' (sent to the host NUL-separated), e.g.
 * "request.headers.x-foo" or "plugin_root_id". Each path is reported as the response header
 *   x-prop-<path>: <status>:<value>
 * where value is the text when every byte is printable ASCII, else "hex:<lower-case hex>";
 * a failed set is reported as x-props-set-status: <status> (also on success).
 */
#include "proxy_wasm.h"

typedef struct report {
  char *name;
  char *value;
  struct report *next;
} report;

typedef struct {
  report *reports;
  int hex;
  char *response_paths; /* x-props-get-response, read in the request phase */
} stream_state;

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (parent) pw_ctx_set(context_id, calloc(1, sizeof(stream_state)));
}

static void add_report(stream_state *s, const char *name, char *value) {
  report *r = calloc(1, sizeof *r), **tail = &s->reports;
  r->name = strdup(name);
  r->value = value;
  while (*tail) tail = &(*tail)->next;
  *tail = r;
}

static int printable(const pw_bytes *b) {
  for (size_t i = 0; i < b->len; i++)
    if (b->data[i] < 0x20 || b->data[i] > 0x7e) return 0;
  return 1;
}

/* Reads every comma-separated path in list and records the results. */
static void read_paths(stream_state *s, const char *list) {
  char *copy = strdup(list);
  for (char *path = strtok(copy, ","); path; path = strtok(NULL, ",")) {
    while (*path == ' ') path++;
    char name[256];
    snprintf(name, sizeof name, "x-prop-%s", path);
    char *wire = strdup(path);
    for (char *c = wire; *c; c++)
      if (*c == '.') *c = 0;
    pw_bytes v;
    int32_t rc = pw_get_property(wire, strlen(path), &v);
    free(wire);
    size_t cap = 16 + 2 * v.len + 8;
    char *value = malloc(cap);
    int n = snprintf(value, cap, "%d:", rc);
    if (!s->hex && printable(&v)) {
      snprintf(value + n, cap - n, "%s", v.data);
    } else {
      n += snprintf(value + n, cap - n, "hex:");
      for (size_t i = 0; i < v.len; i++) n += snprintf(value + n, cap - n, "%02x", (unsigned char)v.data[i]);
    }
    pw_bytes_free(&v);
    add_report(s, name, value);
  }
  free(copy);
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes v;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-props-format", &v) == PW_OK) s->hex = !strcmp(v.data, "hex");
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-props-set", &v) == PW_OK) {
    char *eq = strchr(v.data, '=');
    const char *value = eq ? eq + 1 : "";
    size_t plen = eq ? (size_t)(eq - v.data) : v.len;
    for (size_t i = 0; i < plen; i++)
      if (v.data[i] == '.') v.data[i] = 0;
    char *status = malloc(16);
    snprintf(status, 16, "%d", proxy_set_property(v.data, plen, value, strlen(value)));
    add_report(s, "x-props-set-status", status);
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-props-get", &v) == PW_OK) read_paths(s, v.data);
  pw_bytes_free(&v);
  /* Request headers are not readable in the response phase: keep the list until then. */
  if (pw_get_header(PW_REQUEST_HEADERS, "x-props-get-response", &v) == PW_OK)
    s->response_paths = v.data;
  else
    pw_bytes_free(&v);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  if (s->response_paths) read_paths(s, s->response_paths);
  for (report *r = s->reports; r; r = r->next) pw_add_header(PW_RESPONSE_HEADERS, r->name, r->value);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_take(context_id);
  if (!s) return;
  for (report *r = s->reports, *next; r; r = next) {
    next = r->next;
    free(r->name);
    free(r->value);
    free(r);
  }
  free(s->response_paths);
  free(s);
}
