;; wat_memory_grow: proxy_on_request_headers grows memory without bound: by 1024 pages (64 MiB)
;; at a time until memory.grow fails, then one page at a time until it fails again (bounded by
;; the wasm32 address space, 65536 pages); proxy_on_response_headers reports the final size as
;; "x-memory-pages: <pages>" (Envoy: 16384, its 1 GiB limit).
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-memory-pages")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (block $full
      (loop $more
        (br_if $full (i32.eq (memory.grow (i32.const 1024)) (i32.const -1)))
        (br $more)))
    (block $full_pages
      (loop $more_pages
        (br_if $full_pages (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more_pages)))
    (i32.const 0))
  ;; Writes the decimal digits of memory.size at 64..; returns their count.
  (func $pages_decimal (result i32)
    (local $v i32) (local $n i32) (local $i i32) (local $t i32)
    (local.set $v (memory.size))
    ;; count digits
    (local.set $t (local.get $v))
    (loop $count
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $count (local.get $t)))
    (local.set $i (local.get $n))
    (loop $digit
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (i32.const 64) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digit (local.get $i)))
    (local.get $n))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (local $n i32)
    (local.set $n (call $pages_decimal))
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 14) (i32.const 64) (local.get $n)))
    (i32.const 0))
)
