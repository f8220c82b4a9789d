;; wat_unknown_import: imports a host function no host provides (env.proxy_does_not_exist), so
;; linking must fail. Never calls it.
(module
  (import "env" "proxy_does_not_exist" (func $missing (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $missing (i32.const 0)))
    (i32.const 0))
)
