;; wat_proc_exit: proxy_on_request_headers calls wasi_snapshot_preview1.proc_exit(3); if that
;; returns (the host only logs it), adds the request header "x-after-proc-exit: 1" and continues.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-after-proc-exit1")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $proc_exit (i32.const 3))
    (drop (call $add (i32.const 0) (i32.const 16) (i32.const 17) (i32.const 33) (i32.const 1)))
    (i32.const 0))
)
