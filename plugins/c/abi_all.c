/*
 * abi_all: the kitchen sink. on_request_headers calls every ABI 0.2.1 host function at least
 * once, in ways that do not disturb the request, including error cases, and reports each
 * status as a response header "x-abi-<name>[-<case>]: <status>" (added in
 * on_response_headers). A few calls are also made in on_response_headers (suffix "-response").
 *
 * With the request header "x-abi-send-local-response: <code>", the reports are instead sent as
 * the headers of a local reply with that status and body "abi_all" (the status of
 * proxy_send_local_response itself is then only logged).
 * Names used by the calls: shared-data keys "abi_all.key" / "abi_all.missing", queue
 * "abi_all_queue", metric "abi_all_counter", property "abi_all_prop", cluster "echo" for the
 * successful http_call (its response is ignored) and "nope" for the failing callouts.
 */
#include "proxy_wasm.h"

typedef struct {
  char names[PW_PAIRS_MAX][64];
  char values[PW_PAIRS_MAX][16];
  size_t n;
} reports;

static void report(reports *r, const char *name, int32_t status) {
  if (r->n >= PW_PAIRS_MAX) return;
  snprintf(r->names[r->n], sizeof r->names[0], "x-abi-%s", name);
  snprintf(r->values[r->n], sizeof r->values[0], "%d", status);
  r->n++;
}

typedef struct {
  reports *r;
  int replied; /* sent the reports in a local reply */
} stream_state;

#define S(str) str, (sizeof str - 1)
#define BAD_TYPE 99

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (parent) pw_ctx_set(context_id, calloc(1, sizeof(stream_state)));
}

PW_EXPORT(proxy_on_http_call_response)
void on_http_call_response(uint32_t context_id, uint32_t token, uint32_t headers, uint32_t body, uint32_t trailers) {
  pw_logf(PW_LOG_DEBUG, "abi_all: http_call %u answered", token);
}

/* Whether the request headers are still readable after a group of calls. */
static void probe(reports *r, const char *after) {
  char *p = NULL, name[64];
  size_t n = 0;
  snprintf(name, sizeof name, "probe-after-%s", after);
  report(r, name, proxy_get_header_map_value(PW_REQUEST_HEADERS, S(":path"), &p, &n));
  free(p);
}

static void call_everything(uint32_t context_id, reports *r) {
  char *p = NULL;
  size_t n = 0;
  uint32_t u32 = 0, token = 0, cas = 0;
  uint64_t u64 = 0;
  int32_t level = 0;

  /* logging, clock, timers, contexts */
  report(r, "log", proxy_log(PW_LOG_DEBUG, S("abi_all: log")));
  report(r, "log-bad-level", proxy_log(BAD_TYPE, S("abi_all: bad level")));
  report(r, "get_log_level", proxy_get_log_level(&level));
  report(r, "get_current_time_nanoseconds", proxy_get_current_time_nanoseconds(&u64));
  report(r, "set_tick_period_milliseconds", proxy_set_tick_period_milliseconds(0));
  report(r, "set_effective_context", proxy_set_effective_context(context_id));
  report(r, "set_effective_context-unknown", proxy_set_effective_context(0x7fffff00));
  proxy_set_effective_context(context_id);
  report(r, "done", proxy_done());
  /* buffers (no body yet in the request headers callback) */
  report(r, "get_buffer_bytes-request_body", proxy_get_buffer_bytes(PW_REQUEST_BODY, 0, 10, &p, &n));
  free(p), p = NULL;
  report(r, "get_buffer_bytes-plugin_configuration", proxy_get_buffer_bytes(PW_PLUGIN_CONFIGURATION, 0, 10, &p, &n));
  free(p), p = NULL;
  report(r, "get_buffer_bytes-vm_configuration", proxy_get_buffer_bytes(PW_VM_CONFIGURATION, 0, 10, &p, &n));
  free(p), p = NULL;
  report(r, "get_buffer_bytes-bad_type", proxy_get_buffer_bytes(BAD_TYPE, 0, 10, &p, &n));
  report(r, "set_buffer_bytes-request_body", proxy_set_buffer_bytes(PW_REQUEST_BODY, 0, 0, S("x")));
  report(r, "set_buffer_bytes-bad_type", proxy_set_buffer_bytes(BAD_TYPE, 0, 0, S("x")));
  report(r, "get_buffer_status-request_body", proxy_get_buffer_status(PW_REQUEST_BODY, &n, &u32));
  report(r, "get_buffer_status-bad_type", proxy_get_buffer_status(BAD_TYPE, &n, &u32));
  /* header maps */
  report(r, "get_header_map_size", proxy_get_header_map_size(PW_REQUEST_HEADERS, &n));
  report(r, "get_header_map_size-bad_type", proxy_get_header_map_size(BAD_TYPE, &n));
  char *pairs = NULL;
  size_t pairs_len = 0;
  report(r, "get_header_map_pairs", proxy_get_header_map_pairs(PW_REQUEST_HEADERS, &pairs, &pairs_len));
  report(r, "get_header_map_pairs-bad_type", proxy_get_header_map_pairs(BAD_TYPE, &p, &n));
  report(r, "set_header_map_pairs", proxy_set_header_map_pairs(PW_REQUEST_HEADERS, pairs, pairs_len));
  report(r, "set_header_map_pairs-bad_type", proxy_set_header_map_pairs(BAD_TYPE, pairs, pairs_len));
  free(pairs);
  report(r, "get_header_map_value", proxy_get_header_map_value(PW_REQUEST_HEADERS, S(":path"), &p, &n));
  free(p), p = NULL;
  report(r, "get_header_map_value-missing", proxy_get_header_map_value(PW_REQUEST_HEADERS, S("x-abi-missing"), &p, &n));
  report(r, "get_header_map_value-bad_type", proxy_get_header_map_value(BAD_TYPE, S(":path"), &p, &n));
  report(r, "add_header_map_value", proxy_add_header_map_value(PW_REQUEST_HEADERS, S("x-abi-added"), S("1")));
  report(r, "add_header_map_value-bad_type", proxy_add_header_map_value(BAD_TYPE, S("x-abi-added"), S("1")));
  report(r, "replace_header_map_value", proxy_replace_header_map_value(PW_REQUEST_HEADERS, S("x-abi-replaced"), S("2")));
  report(r, "replace_header_map_value-bad_type", proxy_replace_header_map_value(BAD_TYPE, S("x-abi-replaced"), S("2")));
  report(r, "remove_header_map_value", proxy_remove_header_map_value(PW_REQUEST_HEADERS, S("x-abi-remove-me")));
  report(r, "remove_header_map_value-missing", proxy_remove_header_map_value(PW_REQUEST_HEADERS, S("x-abi-missing")));
  report(r, "remove_header_map_value-bad_type", proxy_remove_header_map_value(BAD_TYPE, S("x-abi-remove-me")));
  /* callouts */
  pw_pairs call = {0};
  pw_pairs_add(&call, S(":method"), S("GET"));
  pw_pairs_add(&call, S(":path"), S("/abi-all"));
  pw_pairs_add(&call, S(":authority"), S("abi-all"));
  pw_bytes wire = pw_pairs_serialize(&call);
  report(r, "http_call", proxy_http_call(S("echo"), wire.data, wire.len, "", 0, NULL, 0, 5000, &token));
  report(r, "http_call-unknown_cluster", proxy_http_call(S("nope"), wire.data, wire.len, "", 0, NULL, 0, 5000, &token));
  pw_pairs no_path = {0};
  pw_pairs_add(&no_path, S(":method"), S("GET"));
  pw_bytes wire2 = pw_pairs_serialize(&no_path);
  report(r, "http_call-no_path", proxy_http_call(S("echo"), wire2.data, wire2.len, "", 0, NULL, 0, 5000, &token));
  pw_bytes_free(&wire2);
  report(r, "grpc_call-unknown_cluster",
         proxy_grpc_call(S("nope"), S("svc.Service"), S("Method"), wire.data, wire.len, S("msg"), 5000, &token));
  report(r, "grpc_stream-unknown_cluster",
         proxy_grpc_stream(S("nope"), S("svc.Service"), S("Method"), wire.data, wire.len, &token));
  pw_bytes_free(&wire);
  report(r, "grpc_send-unknown_token", proxy_grpc_send(0x7fffff00, S("msg"), 0));
  report(r, "grpc_cancel-unknown_token", proxy_grpc_cancel(0x7fffff00));
  report(r, "grpc_close-unknown_token", proxy_grpc_close(0x7fffff00));
  /* shared data and queues */
  report(r, "set_shared_data", proxy_set_shared_data(S("abi_all.key"), S("v"), 0));
  report(r, "get_shared_data", proxy_get_shared_data(S("abi_all.key"), &p, &n, &cas));
  free(p), p = NULL;
  report(r, "set_shared_data-cas_mismatch", proxy_set_shared_data(S("abi_all.key"), S("w"), cas + 1000));
  report(r, "get_shared_data-missing", proxy_get_shared_data(S("abi_all.missing"), &p, &n, &cas));
  uint32_t queue = 0;
  report(r, "register_shared_queue", proxy_register_shared_queue(S("abi_all_queue"), &queue));
  report(r, "resolve_shared_queue", proxy_resolve_shared_queue(S(""), S("abi_all_queue"), &u32));
  report(r, "resolve_shared_queue-missing", proxy_resolve_shared_queue(S(""), S("abi_all_missing"), &u32));
  report(r, "enqueue_shared_queue", proxy_enqueue_shared_queue(queue, S("item")));
  report(r, "enqueue_shared_queue-unknown", proxy_enqueue_shared_queue(0x7fffff00, S("item")));
  report(r, "dequeue_shared_queue", proxy_dequeue_shared_queue(queue, &p, &n));
  free(p), p = NULL;
  report(r, "dequeue_shared_queue-empty", proxy_dequeue_shared_queue(queue, &p, &n));
  report(r, "dequeue_shared_queue-unknown", proxy_dequeue_shared_queue(0x7fffff00, &p, &n));
  /* metrics */
  uint32_t metric = 0;
  report(r, "define_metric", proxy_define_metric(PW_COUNTER, S("abi_all_counter"), &metric));
  report(r, "define_metric-bad_type", proxy_define_metric(BAD_TYPE, S("abi_all_bad"), &u32));
  report(r, "increment_metric", proxy_increment_metric(metric, 1));
  report(r, "increment_metric-unknown", proxy_increment_metric(0x7fffff00, 1));
  report(r, "record_metric", proxy_record_metric(metric, 1));
  report(r, "record_metric-unknown", proxy_record_metric(0x7fffff00, 1));
  report(r, "get_metric", proxy_get_metric(metric, &u64));
  report(r, "get_metric-unknown", proxy_get_metric(0x7fffff00, &u64));
  /* properties and foreign functions */
  report(r, "get_property", proxy_get_property(S("plugin_name"), &p, &n));
  free(p), p = NULL;
  report(r, "get_property-missing", proxy_get_property(S("abi_all_missing"), &p, &n));
  report(r, "set_property", proxy_set_property(S("abi_all_prop"), S("v")));
  report(r, "call_foreign_function-unknown", proxy_call_foreign_function(S("abi_all_nope"), "", 0, &p, &n));
  report(r, "call_foreign_function-clear_route_cache",
         proxy_call_foreign_function(S("clear_route_cache"), "", 0, &p, &n));
  free(p), p = NULL;

  /* streams, last: continuing a stream that is not paused, from inside its own callback, makes
   * its request headers unreadable (BAD_ARGUMENT) in Envoy */
  report(r, "continue_stream-not_paused", proxy_continue_stream(PW_STREAM_REQUEST));
  probe(r, "continue_stream");
  report(r, "continue_stream-bad_type", proxy_continue_stream(BAD_TYPE));
  report(r, "close_stream-bad_type", proxy_close_stream(BAD_TYPE));
  report(r, "get_status", proxy_get_status(&u32, &p, &n));
  free(p);
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  s->r = calloc(1, sizeof *s->r);
  pw_bytes code;
  int32_t code_rc = pw_get_header(PW_REQUEST_HEADERS, "x-abi-send-local-response", &code);
  call_everything(context_id, s->r);
  if (code_rc == PW_OK) {
    pw_pairs pairs = {0};
    for (size_t i = 0; i < s->r->n; i++)
      pw_pairs_add(&pairs, s->r->names[i], strlen(s->r->names[i]), s->r->values[i], strlen(s->r->values[i]));
    pw_bytes wire = pw_pairs_serialize(&pairs);
    int32_t rc = proxy_send_local_response((uint32_t)atoi(code.data), S("abi_all"), S("abi_all"), wire.data, wire.len, -1);
    pw_logf(PW_LOG_INFO, "abi_all: send_local_response: %d", rc);
    s->replied = 1;
    pw_bytes_free(&wire);
    pw_bytes_free(&code);
    return PW_HEADERS_STOP_ITERATION;
  }
  pw_bytes_free(&code);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  if (!s || !s->r || s->replied) return PW_HEADERS_CONTINUE;
  char *p = NULL;
  size_t n = 0;
  uint32_t flags = 0;
  report(s->r, "get_buffer_status-response_body-response", proxy_get_buffer_status(PW_RESPONSE_BODY, &n, &flags));
  report(s->r, "get_header_map_value-request_headers-response",
         proxy_get_header_map_value(PW_REQUEST_HEADERS, S(":path"), &p, &n));
  free(p);
  for (size_t i = 0; i < s->r->n; i++) pw_add_header(PW_RESPONSE_HEADERS, s->r->names[i], s->r->values[i]);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) {
  stream_state *s = pw_ctx_take(context_id);
  if (!s) return;
  free(s->r);
  free(s);
}
