/*
 * The demo's example Proxy-Wasm plugin (ABI 0.2.1), self-contained.
 *
 * Adds the request header "x-wasmproxy-plugin: demo" and the response header
 * "x-wasmproxy-demo: <plugin configuration>". example.wasm is this file built by
 * `python -m plugins.build example` (clang-19, wasm32-wasi reactor); a test checks they match.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, size_t start, size_t max, char **data, size_t *len);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t map, const char *key, size_t klen, const char *value, size_t vlen);

enum { REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2, PLUGIN_CONFIGURATION = 7, LOG_INFO = 2 };

static char *config;
static size_t config_len;

EXPORT(proxy_abi_version_0_2_1) void abi_version(void) {}

EXPORT(proxy_on_memory_allocate) void *on_memory_allocate(size_t size) { return malloc(size); }

EXPORT(proxy_on_context_create) void on_context_create(uint32_t context_id, uint32_t parent_id) {}

EXPORT(proxy_on_vm_start) uint32_t on_vm_start(uint32_t root_id, uint32_t size) { return 1; }

EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  free(config);
  config = NULL;
  config_len = 0;
  if (size > 0 && proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &config, &config_len) != 0) return 0;
  static const char msg[] = "demo plugin configured";
  proxy_log(LOG_INFO, msg, sizeof msg - 1);
  return 1;
}

EXPORT(proxy_on_request_headers) uint32_t on_request_headers(uint32_t context_id, uint32_t n, uint32_t eos) {
  static const char key[] = "x-wasmproxy-plugin", value[] = "demo";
  proxy_add_header_map_value(REQUEST_HEADERS, key, sizeof key - 1, value, sizeof value - 1);
  return 0;
}

EXPORT(proxy_on_response_headers) uint32_t on_response_headers(uint32_t context_id, uint32_t n, uint32_t eos) {
  static const char key[] = "x-wasmproxy-demo";
  proxy_add_header_map_value(RESPONSE_HEADERS, key, sizeof key - 1, config ? config : "", config_len);
  return 0;
}

EXPORT(proxy_on_done) uint32_t on_done(uint32_t context_id) { return 1; }
