;; wat_no_abi: a plugin that exports no proxy_abi_version_* marker (hosts must reject it).
;; Otherwise identical to wat_minimal: adds "x-wat-no-abi: 1" to every response.
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-wat-no-abi1")
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 12) (i32.const 28) (i32.const 1)))
    (i32.const 0))
)
