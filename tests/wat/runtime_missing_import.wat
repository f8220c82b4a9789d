(module
  (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
  (import "env" "proxy_foo" (func (param i32) (result i32)))
  (memory (export "memory") 1)
)
