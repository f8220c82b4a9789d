/*
 * metrics: define, update and read plugin metrics.
 *
 * proxy_on_vm_start defines the counter "<prefix>requests", the gauge "<prefix>gauge" and the
 * histogram "<prefix>histogram" (prefix from the VM configuration, default "metrics_"). Every
 * request increments the counter by 1 in on_request_headers; request headers then do:
 *   x-metrics-gauge-add: <n>     increment_metric(gauge, n)  (n may be negative)
 *   x-metrics-gauge-set: <n>     record_metric(gauge, n)
 *   x-metrics-record: <v>        record_metric(histogram, v)
 * and the response headers report "<status>:<value>" of get_metric for each:
 *   x-metrics-counter, x-metrics-gauge, x-metrics-histogram
 * plus the statuses of the error cases, on request header x-metrics-errors: 1:
 *   x-metrics-bad-type       define_metric(type 7)
 *   x-metrics-bad-id         increment_metric(unknown id)
 *   x-metrics-get-bad-id     get_metric(unknown id)
 *   x-metrics-redefine       "<status>:<1 if the id is the counter's>" for define_metric of the
 *                            counter's name again
 *   x-metrics-counter-record record_metric(counter, 5)
 *   x-metrics-histogram-add  increment_metric(histogram, 1)
 */
#include "proxy_wasm.h"

static uint32_t counter, gauge, histogram;
static char counter_name[96];

PW_EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) {
  pw_bytes config;
  pw_get_buffer(PW_VM_CONFIGURATION, 0, size, &config);
  const char *prefix = config.len ? config.data : "metrics_";
  char name[96];
  int ok = 1;
  snprintf(counter_name, sizeof counter_name, "%srequests", prefix);
  ok &= proxy_define_metric(PW_COUNTER, counter_name, strlen(counter_name), &counter) == PW_OK;
  snprintf(name, sizeof name, "%sgauge", prefix);
  ok &= proxy_define_metric(PW_GAUGE, name, strlen(name), &gauge) == PW_OK;
  snprintf(name, sizeof name, "%shistogram", prefix);
  ok &= proxy_define_metric(PW_HISTOGRAM, name, strlen(name), &histogram) == PW_OK;
  pw_bytes_free(&config);
  return ok;
}

typedef struct {
  char values[6][64];
} stream_state;

PW_EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent) {
  if (parent) pw_ctx_set(context_id, calloc(1, sizeof(stream_state)));
}

static const char *const error_names[6] = {"x-metrics-bad-type",  "x-metrics-bad-id",        "x-metrics-get-bad-id",
                                           "x-metrics-redefine", "x-metrics-counter-record", "x-metrics-histogram-add"};

static int header_number(const char *name, long *out) {
  pw_bytes v;
  int found = pw_get_header(PW_REQUEST_HEADERS, name, &v) == PW_OK;
  if (found) *out = atol(v.data);
  pw_bytes_free(&v);
  return found;
}

PW_EXPORT(proxy_on_request_headers) uint32_t on_request_headers(PW_ON_HEADERS_ARGS) {
  stream_state *s = pw_ctx_get(context_id);
  long n;
  proxy_increment_metric(counter, 1);
  if (header_number("x-metrics-gauge-add", &n)) proxy_increment_metric(gauge, n);
  if (header_number("x-metrics-gauge-set", &n)) proxy_record_metric(gauge, (uint64_t)n);
  if (header_number("x-metrics-record", &n)) proxy_record_metric(histogram, (uint64_t)n);
  if (header_number("x-metrics-errors", &n) && s) {
    uint32_t id = 0;
    uint64_t v = 0;
    snprintf(s->values[0], 64, "%d", proxy_define_metric(7, "metrics_bad", 11, &id));
    snprintf(s->values[1], 64, "%d", proxy_increment_metric(0x7fffff00, 1));
    snprintf(s->values[2], 64, "%d", proxy_get_metric(0x7fffff00, &v));
    int32_t rc = proxy_define_metric(PW_COUNTER, counter_name, strlen(counter_name), &id);
    snprintf(s->values[3], 64, "%d:%d", rc, id == counter);
    snprintf(s->values[4], 64, "%d", proxy_record_metric(counter, 5));
    snprintf(s->values[5], 64, "%d", proxy_increment_metric(histogram, 1));
  }
  return PW_HEADERS_CONTINUE;
}

static void report(const char *name, uint32_t id) {
  uint64_t v = 0;
  int32_t rc = proxy_get_metric(id, &v);
  char text[48];
  snprintf(text, sizeof text, "%d:%llu", rc, (unsigned long long)v);
  pw_add_header(PW_RESPONSE_HEADERS, name, text);
}

PW_EXPORT(proxy_on_response_headers) uint32_t on_response_headers(PW_ON_HEADERS_ARGS) {
  report("x-metrics-counter", counter);
  report("x-metrics-gauge", gauge);
  report("x-metrics-histogram", histogram);
  stream_state *s = pw_ctx_get(context_id);
  for (int i = 0; s && i < 6; i++)
    if (s->values[i][0]) pw_add_header(PW_RESPONSE_HEADERS, error_names[i], s->values[i]);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }

PW_EXPORT(proxy_on_delete) void on_delete(uint32_t context_id) { free(pw_ctx_take(context_id)); }
