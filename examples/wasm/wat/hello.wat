;; The smallest tenantflow workflow: one step, in WebAssembly text. See plugins/sandbox_wasm/ABI.md.
;;
;; Publish it as it is (the kernel compiles .wat too):
;;   client.publish(tenant, "hello", {"hello.wat": open("hello.wat").read()}, runtime="wasm")
;;   client.create(tenant, "Hello", ref)          # -> "hello from WAT"
;;
;; Every reply is JSON {"do": ...}; a real guest parses it. This one only needs to know whether
;; the step must run now (the reply starts with {"do":"run" ...) or was answered from the journal.
(module
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (import "tenantflow" "reply" (func $reply (param i32)))
  (import "tenantflow" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)

  ;; requests, at fixed offsets; replies are copied to 4096
  (data (i32.const 16) "{\"op\":\"step\",\"kind\":\"do\",\"name\":\"greet\"}")
  (data (i32.const 64) "{\"op\":\"result\",\"ok\":true,\"value\":\"hello from WAT\"}")
  (data (i32.const 128) "{\"op\":\"finish\",\"ok\":true,\"value\":\"hello from WAT\"}")
  (data (i32.const 192) "greeting the world")

  ;; Send a request, copy the reply to 4096, return true when the reply says "do":"run".
  (func $send (param $ptr i32) (param $len i32) (result i32)
    (local $n i32)
    (local.set $n (call $call (local.get $ptr) (local.get $len)))
    (if (i32.gt_u (local.get $n) (i32.const 60000)) (then unreachable))
    (call $reply (i32.const 4096))
    ;; bytes 4096.. are {"do":"run" when the step must run: compare the 'r','u' at offset 7
    (i32.and
      (i32.eq (i32.load8_u (i32.const 4103)) (i32.const 114))
      (i32.eq (i32.load8_u (i32.const 4104)) (i32.const 117))))

  (func (export "workflow_Hello")
    (if (call $send (i32.const 16) (i32.const 40))
      (then
        ;; the step body: log a line, then report its result
        (call $log (i32.const 192) (i32.const 18))
        (drop (call $send (i32.const 64) (i32.const 50)))))
    (drop (call $send (i32.const 128) (i32.const 50)))))
