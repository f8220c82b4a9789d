/*
 * local_reply: proxy_send_local_response from a chosen phase.
 *
 * Settings come from the plugin configuration (one "<key> <value>" per line) and are overridden
 * per request by the request headers x-local-reply-<key>:
 *   phase        request_headers | request_body | response_headers | response_body (none: no reply)
 *   status       HTTP status (default 403)
 *   body         response body (default empty)
 *   details      response code details (default "wasm_local_reply")
 *   headers      extra response headers "k1=v1,k2=v2" (config: also "header <k> <v>" lines)
 *   grpc_status  gRPC status, -1 (default) for none
 *   return       stop (default) | continue: what the callback returns after the call
 * The body phases reply on the end_of_stream callback and buffer until then.
 * The status of proxy_send_local_response is logged at info ("local_reply: status <rc>").
 */
#include "proxy_wasm.h"

#define NKEYS 7
static const char *const keys[NKEYS] = {"phase", "status", "body", "details", "headers", "grpc_status", "return"};
/* Settings of one plugin (root context): plugins sharing a VM each have their own. */
typedef struct {
  int is_root; /* 1 for a root context's settings, 0 inside a stream_state */
  char *values[NKEYS];
} settings;

static int key_index(const char *k) {
  for (int i = 0; i < NKEYS; i++)
    if (!strcmp(k, keys[i])) return i;
  return -1;
}

/* Appends "k=v" to the configured headers list. */
static void config_add_header(settings *config, const char *k, const char *v) {
  char *old = config->values[4];
  size_t n = (old ? strlen(old) + 1 : 0) + strlen(k) + strlen(v) + 2;
  char *s = malloc(n);
  snprintf(s, n, "%s%s%s=%s", old ? old : "", old ? "," : "", k, v);
  free(old);
  config->values[4] = s;
}

PW_EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  settings *root = pw_ctx_get(root_id);
  pw_bytes config = pw_get_plugin_config(size);
  char *cursor = config.data, *line;
  while ((line = pw_next_line(&cursor))) {
    char *key = pw_next_word(&line);
    if (!strcmp(key, "header")) {
      char *k = pw_next_word(&line);
      config_add_header(root, k, line);
      continue;
    }
    int i = key_index(key);
    if (i < 0) {
      pw_logf(PW_LOG_ERROR, "local_reply: unknown setting '%s'", key);
      return 0;
    }
    free(root->values[i]);
    root->values[i] = strdup(line);
  }
  pw_bytes_free(&config);
  return 1;
}

/* The effective setting: request header x-local-reply-<key> (read while request headers are
 * available; saved per stream), else the configuration, else def. */
typedef struct {
  int is_root;      /* 0: first, like settings, so on_delete can tell them apart */
  settings request; /* from the request headers */
  settings *root;   /* the plugin's configuration */
} stream_state;

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (!parent) {
    settings *root = calloc(1, sizeof *root);
    root->is_root = 1;
    pw_ctx_set(context_id, root);
    return;
  }
  stream_state *s = calloc(1, sizeof *s);
  s->root = pw_ctx_get(parent);
  pw_ctx_set(context_id, s);
}

static const char *setting(uint32_t context_id, int i, const char *def) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s) return def;
  if (s->request.values[i]) return s->request.values[i];
  return s->root && s->root->values[i] ? s->root->values[i] : def;
}

static void send_reply(uint32_t context_id) {
  uint32_t status = (uint32_t)atoi(setting(context_id, 1, "403"));
  const char *body = setting(context_id, 2, "");
  const char *details = setting(context_id, 3, "wasm_local_reply");
  int32_t grpc = atoi(setting(context_id, 5, "-1"));
  char *list = strdup(setting(context_id, 4, ""));
  pw_pairs pairs = {0};
  for (char *item = strtok(list, ","); item; item = strtok(NULL, ",")) {
    char *eq = strchr(item, '=');
    if (!eq) continue;
    *eq = 0;
    pw_pairs_add(&pairs, item, strlen(item), eq + 1, strlen(eq + 1));
  }
  pw_bytes wire = pw_pairs_serialize(&pairs);
  int32_t rc = proxy_send_local_response(status, details, strlen(details), body, strlen(body), wire.data, wire.len,
                                         grpc);
  pw_logf(PW_LOG_INFO, "local_reply: status %d", rc);
  pw_bytes_free(&wire);
  free(list);
}

static int is_phase(uint32_t context_id, const char *phase) { return !strcmp(setting(context_id, 0, ""), phase); }
static int stop(uint32_t context_id) { return strcmp(setting(context_id, 6, "stop"), "continue") != 0; }

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  for (int i = 0; i < NKEYS; i++) {
    char name[64];
    pw_bytes v;
    snprintf(name, sizeof name, "x-local-reply-%s", keys[i]);
    if (pw_get_header(PW_REQUEST_HEADERS, name, &v) == PW_OK)
      s->request.values[i] = v.data;
    else
      pw_bytes_free(&v);
  }
  if (!is_phase(context_id, "request_headers")) return PW_HEADERS_CONTINUE;
  send_reply(context_id);
  return stop(context_id) ? PW_HEADERS_STOP_ITERATION : PW_HEADERS_CONTINUE;
}

static uint32_t on_body(uint32_t context_id, uint32_t eos, const char *phase) {
  if (!is_phase(context_id, phase)) return PW_DATA_CONTINUE;
  if (!eos) return PW_DATA_STOP_ITERATION_AND_BUFFER;
  send_reply(context_id);
  return stop(context_id) ? PW_DATA_STOP_ITERATION_NO_BUFFER : PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_request_body) uint32_t on_request_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  return on_body(context_id, eos, "request_body");
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  if (!is_phase(context_id, "response_headers")) return PW_HEADERS_CONTINUE;
  send_reply(context_id);
  return stop(context_id) ? PW_HEADERS_STOP_ITERATION : PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_body) uint32_t on_response_body(uint32_t context_id, uint32_t size, uint32_t eos) {
  return on_body(context_id, eos, "response_body");
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || s->is_root) return; /* root settings live as long as the VM */
  pw_ctx_take(context_id);
  for (int i = 0; i < NKEYS; i++) free(s->request.values[i]);
  free(s);
}
