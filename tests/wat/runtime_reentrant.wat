;; A bump allocator the host calls from inside a host call (cpp-host's "malloc" pattern):
;; fetch() asks the host for a buffer; the host allocates it by calling malloc (which grows
;; memory when needed), fills it and writes the pointer and size to fetch's out-parameters.
(module
  (import "env" "get_buffer" (func $get_buffer (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "malloc") (param i32) (result i32)
    (local $p i32) (local $end i32)
    global.get $next local.set $p
    local.get $p local.get 0 i32.add local.set $end
    ;; grow until the end fits: pages needed = ceil(end / 64K) - current pages
    (block $done
      (loop $more
        local.get $end memory.size i32.const 65536 i32.mul i32.le_u br_if $done
        i32.const 1 memory.grow i32.const -1 i32.eq br_if $done
        br $more))
    local.get $end global.set $next
    local.get $p)
  ;; Returns the status of get_buffer; the pointer is at 8 and the size at 12.
  (func (export "fetch") (result i32) i32.const 8 i32.const 12 call $get_buffer)
)
