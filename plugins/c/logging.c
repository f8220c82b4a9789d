/*
 * logging: proxy_log at every level, proxy_get_log_level, and printf through WASI fd_write.
 *
 * on_configure logs "logging: configured: <plugin configuration>" at info.
 * on_request_headers, with msg = request header x-log-message (default "hello"):
 *   proxy_log(level, "logging: level <level>: <msg>") for levels 0 (trace) .. 5 (critical)
 *   proxy_log(9, ...)                          an invalid level
 *   printf("logging: stdout: <msg>\n")         WASI fd 1 (Envoy: info)
 *   fprintf(stderr, "logging: stderr: <msg>\n") WASI fd 2 (Envoy: error)
 * and the response headers report:
 *   x-log-status: <status of each of the six proxy_log calls, comma-separated>
 *   x-log-bad-level: <status of the invalid-level call>
 *   x-log-level: <status>:<level from proxy_get_log_level>
 */
#include "proxy_wasm.h"

typedef struct {
  char status[64];
  char bad_level[16];
  char level[32];
} stream_state;

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (parent) pw_ctx_set(context_id, calloc(1, sizeof(stream_state)));
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  pw_bytes config = pw_get_plugin_config(size);
  pw_logf(PW_LOG_INFO, "logging: configured: %s", config.data);
  pw_bytes_free(&config);
  return 1;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes msg;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-log-message", &msg) != PW_OK) {
    pw_bytes_free(&msg);
    msg = pw_bytes_copy("hello", 5);
  }
  char line[512];
  for (int level = PW_LOG_TRACE; level <= PW_LOG_CRITICAL; level++) {
    int n = snprintf(line, sizeof line, "logging: level %d: %s", level, msg.data);
    size_t used = strlen(s->status);
    snprintf(s->status + used, sizeof s->status - used, used ? ",%d" : "%d", proxy_log(level, line, (size_t)n));
  }
  snprintf(s->bad_level, sizeof s->bad_level, "%d", proxy_log(9, "logging: bad level", 18));
  int32_t level = -1;
  int32_t rc = proxy_get_log_level(&level);
  snprintf(s->level, sizeof s->level, "%d:%d", rc, level);
  printf("logging: stdout: %s\n", msg.data);
  fflush(stdout);
  fprintf(stderr, "logging: stderr: %s\n", msg.data);
  pw_bytes_free(&msg);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  pw_add_header(PW_RESPONSE_HEADERS, "x-log-status", s->status);
  pw_add_header(PW_RESPONSE_HEADERS, "x-log-bad-level", s->bad_level);
  pw_add_header(PW_RESPONSE_HEADERS, "x-log-level", s->level);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) { free(pw_ctx_take(context_id)); }
