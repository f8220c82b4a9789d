/*
 * trap: executes `unreachable` where asked, for failure-policy tests.
 *
 * Per request, the request header x-trap-phase names the callback that traps: request_headers,
 * request_body, request_trailers, response_headers, response_body, response_trailers, log, done,
 * delete. The plugin configuration may hold lines:
 *   trap <phase>        trap in that phase on every request (also: tick, see below)
 *   tick <ms>           set the root context's tick period in on_configure (on_tick traps with "trap tick")
 *   fail_configure      proxy_on_configure returns false        trap_configure  it traps
 * and the VM configuration may hold
 *   fail_vm_start       proxy_on_vm_start returns false         trap_vm_start   it traps
 * Every response passing through a live VM gets "x-trap-plugin: alive" and
 * "x-trap-requests: <n>", n counting requests seen by this VM instance (1 after a restart).
 */
#include "proxy_wasm.h"

typedef struct {
  int is_root;
  char trap_phase[32]; /* from "trap <phase>" */
  int tick_traps;
} root_state;

typedef struct {
  int is_root;
  root_state *root;
  char phase[32]; /* from x-trap-phase */
} stream_state;

static uint32_t requests;

static int has_line(const pw_bytes *text, const char *word) {
  char *copy = strdup(text->data), *cursor = copy, *line;
  int found = 0;
  while ((line = pw_next_line(&cursor)))
    if (!strcmp(line, word)) found = 1;
  free(copy);
  return found;
}

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) {
  pw_bytes config;
  pw_get_buffer(PW_VM_CONFIGURATION, 0, size, &config);
  if (has_line(&config, "trap_vm_start")) __builtin_trap();
  int ok = !has_line(&config, "fail_vm_start");
  pw_bytes_free(&config);
  return ok;
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  root_state *root = pw_ctx_get(root_id);
  pw_bytes config = pw_get_plugin_config(size);
  if (has_line(&config, "trap_configure")) __builtin_trap();
  if (has_line(&config, "fail_configure")) return 0;
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "trap")) {
      snprintf(root->trap_phase, sizeof root->trap_phase, "%s", line);
      if (!strcmp(line, "tick")) root->tick_traps = 1;
    } else if (!strcmp(key, "tick")) {
      proxy_set_tick_period_milliseconds((uint32_t)atoi(line));
    }
  }
  pw_bytes_free(&config);
  return 1;
}

PW_EXPORT(proxy_on_tick) void on_tick(uint32_t root_id) {
  root_state *root = pw_ctx_get(root_id);
  if (root && root->tick_traps) __builtin_trap();
}

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (!parent) {
    root_state *root = calloc(1, sizeof *root);
    root->is_root = 1;
    pw_ctx_set(context_id, root);
    return;
  }
  stream_state *s = calloc(1, sizeof *s);
  s->root = pw_ctx_get(parent);
  pw_ctx_set(context_id, s);
}

/* Traps when phase is the stream's x-trap-phase or its plugin's "trap <phase>". */
static void maybe_trap(uint32_t context_id, const char *phase) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return;
  if (!strcmp(s->phase, phase) || (s->root && !strcmp(s->root->trap_phase, phase))) __builtin_trap();
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  pw_bytes v;
  requests++;
  if (pw_get_header(PW_REQUEST_HEADERS, "x-trap-phase", &v) == PW_OK)
    snprintf(s->phase, sizeof s->phase, "%s", v.data);
  pw_bytes_free(&v);
  maybe_trap(context_id, "request_headers");
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_request_body) uint32_t on_request_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  maybe_trap(context_id, "request_body");
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_request_trailers) uint32_t on_request_trailers(uint32_t context_id, uint32_t n) {
  maybe_trap(context_id, "request_trailers");
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  maybe_trap(context_id, "response_headers");
  char count[16];
  snprintf(count, sizeof count, "%u", requests);
  pw_add_header(PW_RESPONSE_HEADERS, "x-trap-plugin", "alive");
  pw_add_header(PW_RESPONSE_HEADERS, "x-trap-requests", count);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_body) uint32_t on_response_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  maybe_trap(context_id, "response_body");
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_response_trailers) uint32_t on_response_trailers(uint32_t context_id, uint32_t n) {
  maybe_trap(context_id, "response_trailers");
  return PW_CONTINUE;
}

PW_EXPORT(proxy_on_log) void on_log(uint32_t context_id) { maybe_trap(context_id, "log"); }

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) {
  maybe_trap(context_id, "done");
  return 1;
}

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  maybe_trap(context_id, "delete");
  stream_state *s = pw_ctx_get(context_id);
  if (s && !s->is_root) free(pw_ctx_take(context_id));
}
