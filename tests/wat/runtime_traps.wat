;; One export per way a guest can fail; named functions give the trap a readable backtrace.
(module
  (import "env" "tick" (func $tick))
  (import "env" "raise" (func $raise (param i32) (result i32)))
  (memory (export "memory") 1)
  (func $inner_unreachable unreachable)
  (func $do_unreachable (export "do_unreachable") call $inner_unreachable)
  (func $div (export "div") (param i32 i32) (result i32) local.get 0 local.get 1 i32.div_s)
  (func $recurse (export "recurse") (param i32) (result i32)
    local.get 0 i32.const 1 i32.add call $recurse)
  (func $oob (export "oob") (result i32) i32.const 0x7ffffff0 i32.load)
  ;; Spins forever, calling the host each round (the host may tick the epoch).
  (func $spin (export "spin") (loop $l call $tick br $l))
  (func $call_raise (export "call_raise") (param i32) (result i32) local.get 0 call $raise)
  (func (export "ok") (result i32) i32.const 42)
)
