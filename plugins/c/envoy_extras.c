/*
 * envoy_extras: Envoy's own additions to the ABI (envoy_resolve_dns / envoy_on_resolve_dns and the
 * foreign functions declare_property and set_envoy_filter_state).
 *
 * Plugin configuration, one directive a line, run in on_configure (each status is kept and
 * reported on every response as x-declare: <rc>[,<rc>...]):
 *   declare <name> <readonly 0|1> <type 0..3>     declare_property (DeclarePropertyArguments)
 * Request headers (the stream is answered with a 200 local reply whose body lists the results,
 * one "<what>=<status>[:<value>]" a line):
 *   x-declare-here: <name>            declare_property(name, readonly) from the stream context
 *   x-set: <name>=<value>[,...]       proxy_set_property, in order
 *   x-get: <name>[,...]               proxy_get_property of one top-level name
 *   x-fs: <key>=<value>               set_envoy_filter_state, then get_property filter_state.<key>
 *   x-foreign: <name>                 proxy_call_foreign_function(name, "\xff") (bad arguments)
 *   x-dns: <name>                     envoy_resolve_dns; the stream pauses until the root context's
 *                                     envoy_on_resolve_dns, whose CallData is replied as
 *                                     "dns=<rc> token=<t> inline=<0|1> size=<n> count=<c>" then one
 *                                     "<ttl> <address>" line per entry.
 */
#include "proxy_wasm.h"

PW_IMPORT(envoy_resolve_dns) int32_t envoy_resolve_dns(const char *address, size_t len, uint32_t *token);

static char declare_report[256];

/* A stream waiting for a DNS answer: its context and the token the host gave. */
typedef struct pending {
  uint32_t context_id;
  uint32_t token;
  struct pending *next;
} pending;
static pending *pending_list;
/* The stream whose envoy_resolve_dns call is in progress (an answer may come before it returns). */
static uint32_t resolving_stream;
static int answered_inline;

/* Appends a varint-keyed protobuf field; returns the new end. */
static char *pb_varint(char *w, uint64_t v) {
  do {
    uint8_t b = v & 0x7f;
    v >>= 7;
    *w++ = (char)(b | (v ? 0x80 : 0));
  } while (v);
  return w;
}

static char *pb_bytes(char *w, int field, const char *data, size_t len) {
  w = pb_varint(w, (uint64_t)(field << 3 | 2));
  w = pb_varint(w, len);
  memcpy(w, data, len);
  return w + len;
}

static char *pb_uint(char *w, int field, uint64_t v) {
  w = pb_varint(w, (uint64_t)(field << 3));
  return pb_varint(w, v);
}

static int32_t foreign(const char *name, const char *args, size_t len) {
  char *result = NULL;
  size_t result_len = 0;
  int32_t rc = proxy_call_foreign_function(name, strlen(name), args, len, &result, &result_len);
  free(result);
  return rc;
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) { return 1; }

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data;
  size_t used = 0;
  declare_report[0] = 0;
  for (char *line; (line = pw_next_line(&cursor));) {
    char *word = pw_next_word(&line);
    if (strcmp(word, "declare")) continue;
    char *name = pw_next_word(&line);
    int readonly = atoi(pw_next_word(&line));
    int type = atoi(pw_next_word(&line));
    char args[512], *w = args;
    w = pb_bytes(w, 1, name, strlen(name));
    if (readonly) w = pb_uint(w, 2, 1);
    if (type) w = pb_uint(w, 3, (uint64_t)type);
    int32_t rc = foreign("declare_property", args, (size_t)(w - args));
    used += snprintf(declare_report + used, sizeof declare_report - used, "%s%d", used ? "," : "", rc);
  }
  pw_bytes_free(&config);
  return 1;
}

/* A growing reply body. */
typedef struct {
  char text[4096];
  size_t len;
} reply;

static void say(reply *r, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(r->text + r->len, sizeof r->text - r->len, fmt, ap);
  va_end(ap);
  if (n > 0) r->len += (size_t)n < sizeof r->text - r->len ? (size_t)n : sizeof r->text - r->len - 1;
}

static void send_reply(const reply *r) {
  pw_pairs headers = {0};
  pw_pairs_add(&headers, "x-declare", 9, declare_report, strlen(declare_report));
  pw_bytes wire = pw_pairs_serialize(&headers);
  proxy_send_local_response(200, "envoy_extras", 12, r->text, r->len, wire.data, wire.len, -1);
  pw_bytes_free(&wire);
}

static void get_value(reply *r, const char *label, const char *path, size_t path_len) {
  pw_bytes v;
  int32_t rc = pw_get_property(path, path_len, &v);
  say(r, "%s=%d:%s\n", label, rc, v.data);
  pw_bytes_free(&v);
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  reply r = {.len = 0};
  pw_bytes v;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-declare-here", &v) == PW_OK) {
    char args[512], *w = args;
    w = pb_bytes(w, 1, v.data, strlen(v.data));
    w = pb_uint(w, 2, 1);
    say(&r, "declare %s=%d\n", v.data, foreign("declare_property", args, (size_t)(w - args)));
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-set", &v) == PW_OK) {
    for (char *item = strtok(v.data, ","); item; item = strtok(NULL, ",")) {
      char *eq = strchr(item, '=');
      if (!eq) continue;
      *eq = 0;
      say(&r, "set %s=%d\n", item, proxy_set_property(item, strlen(item), eq + 1, strlen(eq + 1)));
    }
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-get", &v) == PW_OK) {
    for (char *item = strtok(v.data, ","); item; item = strtok(NULL, ",")) {
      char label[128];
      snprintf(label, sizeof label, "get %s", item);
      get_value(&r, label, item, strlen(item));
    }
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-fs", &v) == PW_OK) {
    char *eq = strchr(v.data, '=');
    if (eq) {
      *eq = 0;
      char args[512], *w = args;
      w = pb_bytes(w, 1, v.data, strlen(v.data));
      w = pb_bytes(w, 2, eq + 1, strlen(eq + 1));
      say(&r, "fs %s=%d\n", v.data, foreign("set_envoy_filter_state", args, (size_t)(w - args)));
      char path[256];
      int n = snprintf(path, sizeof path, "filter_state%c%s", 0, v.data);
      get_value(&r, "get filter_state", path, (size_t)n);
    }
  }
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-foreign", &v) == PW_OK)
    say(&r, "foreign %s=%d\n", v.data, foreign(v.data, "\xff", 1));
  pw_bytes_free(&v);
  if (pw_get_header(PW_REQUEST_HEADERS, "x-dns", &v) == PW_OK) {
    uint32_t token = 0;
    resolving_stream = context_id;
    answered_inline = 0;
    int32_t rc = envoy_resolve_dns(v.data, v.len, &token);
    resolving_stream = 0;
    pw_bytes_free(&v);
    if (rc != PW_OK) {
      say(&r, "dns=%d\n", rc);
      send_reply(&r);
      return PW_HEADERS_STOP_ITERATION;
    }
    if (!answered_inline) {
      pending *p = calloc(1, sizeof *p);
      p->context_id = context_id;
      p->token = token;
      p->next = pending_list;
      pending_list = p;
    }
    return PW_HEADERS_STOP_ITERATION;
  }
  pw_bytes_free(&v);
  send_reply(&r);
  return PW_HEADERS_STOP_ITERATION;
}

PW_EXPORT(envoy_on_resolve_dns) void on_resolve_dns(uint32_t root_id, uint32_t token, uint32_t size) {
  uint32_t stream = 0;
  int is_inline = 0;
  for (pending **p = &pending_list; *p; p = &(*p)->next) {
    if ((*p)->token == token) {
      pending *found = *p;
      stream = found->context_id;
      *p = found->next;
      free(found);
      break;
    }
  }
  if (!stream && resolving_stream) {
    stream = resolving_stream;
    is_inline = answered_inline = 1;
  }
  if (!stream) return;
  reply r = {.len = 0};
  pw_bytes data;
  pw_get_buffer(PW_CALL_DATA, 0, size, &data);
  uint32_t count = data.len >= 4 ? pw_u32_at(data.data) : 0;
  say(&r, "dns=0 token=%u inline=%d size=%u count=%u\n", token, is_inline, size, count);
  const char *address = data.data + 4 + 4 * (size_t)count;
  for (uint32_t i = 0; i < count && address < data.data + data.len; i++) {
    say(&r, "%u %s\n", pw_u32_at(data.data + 4 + 4 * i), address);
    address += strlen(address) + 1;
  }
  pw_bytes_free(&data);
  proxy_set_effective_context(stream);
  send_reply(&r);
}
