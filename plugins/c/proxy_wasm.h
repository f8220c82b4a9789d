/*
 * proxy_wasm.h - the raw Proxy-Wasm ABI for wasmproxy's C test plugins, plus tiny helpers.
 *
 * Written for this project from the ABI spec (github proxy-wasm/spec, abi-versions/) and the
 * reference host's export table (proxy-wasm-cpp-host include/proxy-wasm/exports.h).
 *
 * Every plugin is one C file that includes this header once. Select the ABI with
 * -DPROXY_WASM_ABI=10 | 20 | 21 (default 21): the header then exports the matching
 * proxy_abi_version_X_Y_Z marker and PW_ON_HEADERS_ARGS gives the header-callback parameters
 * (0.1.0 header callbacks have no end_of_stream flag). Define PW_NO_ABI_MARKER to export none.
 *
 * Helpers allocate results with malloc (the host allocates returned data through the exported
 * malloc, so the plugin frees it with free).
 */
#ifndef WASMPROXY_PROXY_WASM_H
#define WASMPROXY_PROXY_WASM_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PROXY_WASM_ABI
#define PROXY_WASM_ABI 21
#endif

#define PW_EXPORT(name) __attribute__((export_name(#name)))
#define PW_IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

/* ------------------------------------------------------------------ enums */

typedef enum {
  PW_OK = 0,
  PW_NOT_FOUND = 1,
  PW_BAD_ARGUMENT = 2,
  PW_SERIALIZATION_FAILURE = 3,
  PW_PARSE_FAILURE = 4,
  PW_INVALID_MEMORY_ACCESS = 6,
  PW_EMPTY = 7,
  PW_CAS_MISMATCH = 8,
  PW_INTERNAL_FAILURE = 10,
  PW_UNIMPLEMENTED = 12,
} pw_result;

typedef enum {
  PW_REQUEST_HEADERS = 0,
  PW_REQUEST_TRAILERS = 1,
  PW_RESPONSE_HEADERS = 2,
  PW_RESPONSE_TRAILERS = 3,
  PW_GRPC_RECEIVE_INITIAL_METADATA = 4,
  PW_GRPC_RECEIVE_TRAILING_METADATA = 5,
  PW_HTTP_CALL_RESPONSE_HEADERS = 6,
  PW_HTTP_CALL_RESPONSE_TRAILERS = 7,
} pw_map_type;

typedef enum {
  PW_REQUEST_BODY = 0,
  PW_RESPONSE_BODY = 1,
  PW_DOWNSTREAM_DATA = 2,
  PW_UPSTREAM_DATA = 3,
  PW_HTTP_CALL_RESPONSE_BODY = 4,
  PW_GRPC_RECEIVE_BUFFER = 5,
  PW_VM_CONFIGURATION = 6,
  PW_PLUGIN_CONFIGURATION = 7,
  PW_CALL_DATA = 8,
} pw_buffer_type;

typedef enum {
  PW_LOG_TRACE = 0,
  PW_LOG_DEBUG = 1,
  PW_LOG_INFO = 2,
  PW_LOG_WARN = 3,
  PW_LOG_ERROR = 4,
  PW_LOG_CRITICAL = 5,
} pw_log_level;

/* Return values of the header / body / trailer callbacks. */
enum { PW_CONTINUE = 0, PW_STOP_ITERATION = 1 };
enum {
  PW_HEADERS_CONTINUE = 0,
  PW_HEADERS_STOP_ITERATION = 1,
  PW_HEADERS_CONTINUE_AND_END_STREAM = 2,
  PW_HEADERS_STOP_ALL_ITERATION_AND_BUFFER = 3,
  PW_HEADERS_STOP_ALL_ITERATION_AND_WATERMARK = 4,
};
enum {
  PW_DATA_CONTINUE = 0,
  PW_DATA_STOP_ITERATION_AND_BUFFER = 1,
  PW_DATA_STOP_ITERATION_AND_WATERMARK = 2,
  PW_DATA_STOP_ITERATION_NO_BUFFER = 3,
};

typedef enum { PW_COUNTER = 0, PW_GAUGE = 1, PW_HISTOGRAM = 2 } pw_metric_type;
typedef enum { PW_STREAM_REQUEST = 0, PW_STREAM_RESPONSE = 1, PW_STREAM_DOWNSTREAM = 2, PW_STREAM_UPSTREAM = 3 } pw_stream_type;

/* ---------------------------------------------------------------- imports */

/* Logging, clock, timers. */
PW_IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
#if PROXY_WASM_ABI >= 21
PW_IMPORT(proxy_get_log_level) int32_t proxy_get_log_level(int32_t *level);
#endif
PW_IMPORT(proxy_get_current_time_nanoseconds) int32_t proxy_get_current_time_nanoseconds(uint64_t *nanos);
PW_IMPORT(proxy_set_tick_period_milliseconds) int32_t proxy_set_tick_period_milliseconds(uint32_t ms);

/* Contexts. */
PW_IMPORT(proxy_set_effective_context) int32_t proxy_set_effective_context(uint32_t context_id);
PW_IMPORT(proxy_done) int32_t proxy_done(void);

/* Buffers. */
PW_IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, size_t start, size_t max, char **data, size_t *len);
PW_IMPORT(proxy_set_buffer_bytes)
int32_t proxy_set_buffer_bytes(int32_t type, size_t start, size_t size, const char *data, size_t len);
PW_IMPORT(proxy_get_buffer_status) int32_t proxy_get_buffer_status(int32_t type, size_t *len, uint32_t *flags);

/* Header maps. */
PW_IMPORT(proxy_get_header_map_size) int32_t proxy_get_header_map_size(int32_t type, size_t *size);
PW_IMPORT(proxy_get_header_map_pairs) int32_t proxy_get_header_map_pairs(int32_t type, char **data, size_t *len);
PW_IMPORT(proxy_set_header_map_pairs) int32_t proxy_set_header_map_pairs(int32_t type, const char *data, size_t len);
PW_IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(int32_t type, const char *key, size_t klen, char **value, size_t *vlen);
PW_IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t type, const char *key, size_t klen, const char *value, size_t vlen);
PW_IMPORT(proxy_replace_header_map_value)
int32_t proxy_replace_header_map_value(int32_t type, const char *key, size_t klen, const char *value, size_t vlen);
PW_IMPORT(proxy_remove_header_map_value) int32_t proxy_remove_header_map_value(int32_t type, const char *key, size_t klen);

/* Streams. */
#if PROXY_WASM_ABI >= 20
PW_IMPORT(proxy_continue_stream) int32_t proxy_continue_stream(int32_t stream_type);
PW_IMPORT(proxy_close_stream) int32_t proxy_close_stream(int32_t stream_type);
#else
PW_IMPORT(proxy_continue_request) int32_t proxy_continue_request(void);
PW_IMPORT(proxy_continue_response) int32_t proxy_continue_response(void);
PW_IMPORT(proxy_clear_route_cache) int32_t proxy_clear_route_cache(void);
PW_IMPORT(proxy_get_configuration) int32_t proxy_get_configuration(char **data, size_t *len);
#endif
PW_IMPORT(proxy_get_status) int32_t proxy_get_status(uint32_t *code, char **msg, size_t *len);
PW_IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(uint32_t status, const char *details, size_t dlen, const char *body, size_t blen,
                                  const char *pairs, size_t plen, int32_t grpc_status);

/* Callouts. */
PW_IMPORT(proxy_http_call)
int32_t proxy_http_call(const char *upstream, size_t ulen, const char *headers, size_t hlen, const char *body,
                        size_t blen, const char *trailers, size_t tlen, uint32_t timeout_ms, uint32_t *token);
PW_IMPORT(proxy_grpc_call)
int32_t proxy_grpc_call(const char *upstream, size_t ulen, const char *service, size_t slen, const char *method,
                        size_t mlen, const char *metadata, size_t mdlen, const char *msg, size_t msglen,
                        uint32_t timeout_ms, uint32_t *token);
PW_IMPORT(proxy_grpc_stream)
int32_t proxy_grpc_stream(const char *upstream, size_t ulen, const char *service, size_t slen, const char *method,
                          size_t mlen, const char *metadata, size_t mdlen, uint32_t *token);
PW_IMPORT(proxy_grpc_send) int32_t proxy_grpc_send(uint32_t token, const char *msg, size_t len, int32_t end_stream);
PW_IMPORT(proxy_grpc_cancel) int32_t proxy_grpc_cancel(uint32_t token);
PW_IMPORT(proxy_grpc_close) int32_t proxy_grpc_close(uint32_t token);

/* Shared data and queues. */
PW_IMPORT(proxy_get_shared_data)
int32_t proxy_get_shared_data(const char *key, size_t klen, char **value, size_t *vlen, uint32_t *cas);
PW_IMPORT(proxy_set_shared_data)
int32_t proxy_set_shared_data(const char *key, size_t klen, const char *value, size_t vlen, uint32_t cas);
PW_IMPORT(proxy_register_shared_queue) int32_t proxy_register_shared_queue(const char *name, size_t len, uint32_t *id);
PW_IMPORT(proxy_resolve_shared_queue)
int32_t proxy_resolve_shared_queue(const char *vm_id, size_t vlen, const char *name, size_t nlen, uint32_t *id);
PW_IMPORT(proxy_enqueue_shared_queue) int32_t proxy_enqueue_shared_queue(uint32_t id, const char *data, size_t len);
PW_IMPORT(proxy_dequeue_shared_queue) int32_t proxy_dequeue_shared_queue(uint32_t id, char **data, size_t *len);

/* Metrics. */
PW_IMPORT(proxy_define_metric) int32_t proxy_define_metric(int32_t type, const char *name, size_t len, uint32_t *id);
PW_IMPORT(proxy_increment_metric) int32_t proxy_increment_metric(uint32_t id, int64_t offset);
PW_IMPORT(proxy_record_metric) int32_t proxy_record_metric(uint32_t id, uint64_t value);
PW_IMPORT(proxy_get_metric) int32_t proxy_get_metric(uint32_t id, uint64_t *value);

/* Properties and foreign functions. */
PW_IMPORT(proxy_get_property) int32_t proxy_get_property(const char *path, size_t plen, char **value, size_t *vlen);
PW_IMPORT(proxy_set_property)
int32_t proxy_set_property(const char *path, size_t plen, const char *value, size_t vlen);
PW_IMPORT(proxy_call_foreign_function)
int32_t proxy_call_foreign_function(const char *name, size_t nlen, const char *args, size_t alen, char **result,
                                    size_t *rlen);

/* ----------------------------------------------------- ABI marker, memory */

#ifndef PW_NO_ABI_MARKER
#if PROXY_WASM_ABI == 10
PW_EXPORT(proxy_abi_version_0_1_0) void pw_abi_marker(void) {}
#elif PROXY_WASM_ABI == 20
PW_EXPORT(proxy_abi_version_0_2_0) void pw_abi_marker(void) {}
#else
PW_EXPORT(proxy_abi_version_0_2_1) void pw_abi_marker(void) {}
#endif
#endif

/* The host allocates returned data in guest memory through this (malloc is also exported). */
PW_EXPORT(proxy_on_memory_allocate) void *pw_on_memory_allocate(size_t size) { return malloc(size); }

#if PROXY_WASM_ABI >= 20
#define PW_ON_HEADERS_ARGS uint32_t context_id, uint32_t headers, uint32_t end_of_stream
#define PW_HEADERS_EOS end_of_stream
#else
#define PW_ON_HEADERS_ARGS uint32_t context_id, uint32_t headers
#define PW_HEADERS_EOS 0
#endif

/* ---------------------------------------------------------------- helpers */

/* proxy_log with printf formatting. */
static inline void pw_logf(int32_t level, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
  proxy_log(level, buf, (size_t)n);
}

/* A byte string owned by the plugin (NUL-terminated for convenience). */
typedef struct {
  char *data;
  size_t len;
} pw_bytes;

/* Copies len bytes into a fresh NUL-terminated pw_bytes. */
static inline pw_bytes pw_bytes_copy(const char *data, size_t len) {
  pw_bytes b = {malloc(len + 1), len};
  if (len) memcpy(b.data, data, len);
  b.data[len] = 0;
  return b;
}

/* Takes ownership of host-allocated data and NUL-terminates it. */
static inline pw_bytes pw_bytes_take(char *data, size_t len) {
  pw_bytes b = pw_bytes_copy(data ? data : "", data ? len : 0);
  free(data);
  return b;
}

static inline void pw_bytes_free(pw_bytes *b) {
  free(b->data);
  b->data = NULL;
  b->len = 0;
}

/* Header value; returns the status; *out is always a valid (possibly empty) string. */
static inline int32_t pw_get_header(int32_t map, const char *name, pw_bytes *out) {
  char *v = NULL;
  size_t n = 0;
  int32_t rc = proxy_get_header_map_value(map, name, strlen(name), &v, &n);
  *out = pw_bytes_take(rc == PW_OK ? v : NULL, n);
  return rc;
}

static inline int32_t pw_add_header(int32_t map, const char *name, const char *value) {
  return proxy_add_header_map_value(map, name, strlen(name), value, strlen(value));
}

static inline int32_t pw_replace_header(int32_t map, const char *name, const char *value) {
  return proxy_replace_header_map_value(map, name, strlen(name), value, strlen(value));
}

static inline int32_t pw_remove_header(int32_t map, const char *name) {
  return proxy_remove_header_map_value(map, name, strlen(name));
}

/* Whole buffer (up to max bytes from start). */
static inline int32_t pw_get_buffer(int32_t type, size_t start, size_t max, pw_bytes *out) {
  char *v = NULL;
  size_t n = 0;
  int32_t rc = proxy_get_buffer_bytes(type, start, max, &v, &n);
  *out = pw_bytes_take(rc == PW_OK ? v : NULL, n);
  return rc;
}

/* The plugin configuration (PLUGIN_CONFIGURATION buffer, or proxy_get_configuration in ABI 0.1.0). */
static inline pw_bytes pw_get_plugin_config(size_t size) {
  pw_bytes b;
#if PROXY_WASM_ABI >= 20
  pw_get_buffer(PW_PLUGIN_CONFIGURATION, 0, size, &b);
#else
  char *v = NULL;
  size_t n = 0;
  int32_t rc = proxy_get_configuration(&v, &n);
  (void)size;
  b = pw_bytes_take(rc == PW_OK ? v : NULL, n);
#endif
  return b;
}

/* Property value for a path given as NUL-separated segments (path_len counts them all). */
static inline int32_t pw_get_property(const char *path, size_t path_len, pw_bytes *out) {
  char *v = NULL;
  size_t n = 0;
  int32_t rc = proxy_get_property(path, path_len, &v, &n);
  *out = pw_bytes_take(rc == PW_OK ? v : NULL, n);
  return rc;
}

/* ------------------------------------------------ serialized header pairs */

/* Builder for the header-map wire format: u32 count, (u32 klen, u32 vlen) x count, then each
 * key and value followed by a NUL. Add at most PW_PAIRS_MAX pairs. */
#define PW_PAIRS_MAX 128
typedef struct {
  size_t n;
  const char *key[PW_PAIRS_MAX];
  size_t klen[PW_PAIRS_MAX];
  const char *val[PW_PAIRS_MAX];
  size_t vlen[PW_PAIRS_MAX];
} pw_pairs;

static inline void pw_pairs_add(pw_pairs *p, const char *k, size_t kl, const char *v, size_t vl) {
  if (p->n >= PW_PAIRS_MAX) return;
  p->key[p->n] = k;
  p->klen[p->n] = kl;
  p->val[p->n] = v;
  p->vlen[p->n] = vl;
  p->n++;
}

static inline void pw_put_u32(char *at, uint32_t v) { memcpy(at, &v, 4); }
static inline uint32_t pw_u32_at(const char *at) {
  uint32_t v;
  memcpy(&v, at, 4);
  return v;
}

/* Serializes; the result is malloc'd. */
static inline pw_bytes pw_pairs_serialize(const pw_pairs *p) {
  size_t size = 4 + 8 * p->n;
  for (size_t i = 0; i < p->n; i++) size += p->klen[i] + p->vlen[i] + 2;
  pw_bytes out = {malloc(size + 1), size};
  char *w = out.data;
  pw_put_u32(w, (uint32_t)p->n);
  w += 4;
  for (size_t i = 0; i < p->n; i++) {
    pw_put_u32(w, (uint32_t)p->klen[i]);
    pw_put_u32(w + 4, (uint32_t)p->vlen[i]);
    w += 8;
  }
  for (size_t i = 0; i < p->n; i++) {
    memcpy(w, p->key[i], p->klen[i]);
    w += p->klen[i];
    *w++ = 0;
    memcpy(w, p->val[i], p->vlen[i]);
    w += p->vlen[i];
    *w++ = 0;
  }
  return out;
}

/* Parses the wire format in place into p (pointers into data); returns 0 on malformed input. */
static inline int pw_pairs_parse(const char *data, size_t len, pw_pairs *p) {
  p->n = 0;
  if (len < 4) return len == 0;
  uint32_t n = pw_u32_at(data);
  if (n > PW_PAIRS_MAX || 4 + 8 * (size_t)n > len) return 0;
  const char *r = data + 4 + 8 * n;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t kl = pw_u32_at(data + 4 + 8 * i), vl = pw_u32_at(data + 8 + 8 * i);
    if ((size_t)(r - data) + kl + vl + 2 > len) return 0;
    pw_pairs_add(p, r, kl, r + kl + 1, vl);
    r += kl + vl + 2;
  }
  return 1;
}

/* ------------------------------------------------------- text configuration */

/* Plugins take a small line-based configuration: one directive per line, words separated by
 * single spaces, the last argument taking the rest of the line. Lines starting with '#' and
 * blank lines are skipped. pw_next_line walks the lines of text (modified in place). */
static inline char *pw_next_line(char **cursor) {
  while (**cursor) {
    char *line = *cursor;
    char *nl = strchr(line, '\n');
    if (nl) {
      *nl = 0;
      *cursor = nl + 1;
    } else {
      *cursor = line + strlen(line);
    }
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\r' || line[n - 1] == ' ')) line[--n] = 0;
    while (*line == ' ') line++;
    if (*line && *line != '#') return line;
  }
  return NULL;
}

/* Splits off the next space-separated word of *rest (modified in place); "" when none is left. */
static inline char *pw_next_word(char **rest) {
  char *w = *rest;
  while (*w == ' ') w++;
  char *sp = strchr(w, ' ');
  if (sp) {
    *sp = 0;
    *rest = sp + 1;
  } else {
    *rest = w + strlen(w);
  }
  return w;
}

/* Map names used in configurations and headers. */
static inline int32_t pw_map_by_name(const char *name) {
  if (!strcmp(name, "request_headers")) return PW_REQUEST_HEADERS;
  if (!strcmp(name, "request_trailers")) return PW_REQUEST_TRAILERS;
  if (!strcmp(name, "response_headers")) return PW_RESPONSE_HEADERS;
  if (!strcmp(name, "response_trailers")) return PW_RESPONSE_TRAILERS;
  return -1;
}

/* ------------------------------------------------------ per-context state */

/* A tiny map from context id to plugin-owned state (a linked list: tests keep few streams alive). */
typedef struct pw_ctx_entry {
  uint32_t id;
  void *state;
  struct pw_ctx_entry *next;
} pw_ctx_entry;
static pw_ctx_entry *pw_ctx_list;

static inline void *pw_ctx_get(uint32_t id) {
  for (pw_ctx_entry *e = pw_ctx_list; e; e = e->next)
    if (e->id == id) return e->state;
  return NULL;
}

static inline void pw_ctx_set(uint32_t id, void *state) {
  pw_ctx_entry *e = malloc(sizeof *e);
  e->id = id;
  e->state = state;
  e->next = pw_ctx_list;
  pw_ctx_list = e;
}

/* Defines proxy_on_context_create for the common shape: a zeroed ROOT_TYPE (with an `is_root`
   flag) per root context and a zeroed STREAM_TYPE (with a `root` pointer to its root's state)
   per stream context, both kept in the context map above. */
#define PW_DEFINE_CONTEXT_CREATE(ROOT_TYPE, STREAM_TYPE)                                          \
  PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) { \
    if (!parent) {                                                                                \
      ROOT_TYPE *r_ = calloc(1, sizeof *r_);                                                      \
      r_->is_root = 1;                                                                            \
      pw_ctx_set(context_id, r_);                                                                 \
      return;                                                                                     \
    }                                                                                             \
    STREAM_TYPE *s_ = calloc(1, sizeof *s_);                                                      \
    s_->root = pw_ctx_get(parent);                                                                \
    pw_ctx_set(context_id, s_);                                                                   \
  }

/* Unlinks the entry for id and returns its state (the caller frees it). */
static inline void *pw_ctx_take(uint32_t id) {
  for (pw_ctx_entry **p = &pw_ctx_list; *p; p = &(*p)->next) {
    if ((*p)->id == id) {
      pw_ctx_entry *e = *p;
      void *state = e->state;
      *p = e->next;
      free(e);
      return state;
    }
  }
  return NULL;
}

#endif /* WASMPROXY_PROXY_WASM_H */
