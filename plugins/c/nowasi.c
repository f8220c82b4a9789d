/*
 * nowasi: a plugin built without libc or WASI (--target=wasm32 -nostdlib), so its only imports
 * are from "env". Adds the response header "x-nowasi: <plugin configuration>" (up to 256 bytes)
 * and allocates with a bump allocator exported as proxy_on_memory_allocate.
 */
#include <stddef.h>
#include <stdint.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, size_t start, size_t max, char **data, size_t *len);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t map, const char *key, size_t klen, const char *value, size_t vlen);

static unsigned char heap[64 * 1024];
static size_t heap_used;
static char config[256];
static size_t config_len;

EXPORT(proxy_abi_version_0_2_1) void abi_version(void) {}

/* Bump allocation; the heap resets whenever it would overflow (tests allocate little). */
EXPORT(proxy_on_memory_allocate) void *on_memory_allocate(size_t size) {
  size = (size + 7) & ~(size_t)7;
  if (size > sizeof heap) return 0;
  if (heap_used + size > sizeof heap) heap_used = 0;
  void *p = heap + heap_used;
  heap_used += size;
  return p;
}

EXPORT(proxy_on_configure) uint32_t on_configure(uint32_t root_id, uint32_t size) {
  char *data = 0;
  size_t len = 0;
  config_len = 0;
  if (size && proxy_get_buffer_bytes(7, 0, size, &data, &len) == 0) {
    for (; config_len < len && config_len < sizeof config; config_len++) config[config_len] = data[config_len];
  }
  return 1;
}

EXPORT(proxy_on_response_headers) uint32_t on_response_headers(uint32_t context_id, uint32_t n, uint32_t eos) {
  static const char key[] = "x-nowasi";
  proxy_add_header_map_value(2, key, sizeof key - 1, config, config_len);
  return 0;
}
