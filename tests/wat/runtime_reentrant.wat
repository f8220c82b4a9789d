;; A bump allocator the host calls from inside a host call (cpp-host's "malloc" pattern):
;; fetch() asks the host for a buffer; the host allocates it by calling malloc, fills it and
;; writes the pointer and size to fetch's out-parameters.
(module
  (import "env" "get_buffer" (func $get_buffer (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "malloc") (param i32) (result i32)
    (local $p i32)
    global.get $next local.set $p
    global.get $next local.get 0 i32.add global.set $next
    local.get $p)
  ;; Returns the status of get_buffer; the pointer is at 8 and the size at 12.
  (func (export "fetch") (result i32) i32.const 8 i32.const 12 call $get_buffer)
)
