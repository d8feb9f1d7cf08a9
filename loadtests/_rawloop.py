"""A raw wasm module that runs N trivial durable steps through the JSON guest ABI, for benchmarks.

A raw module cannot read its params without a JSON parser: the step count is baked in. Steps are
keyed by the kernel's ABI layer ("s#0", "s#1", ...); ``nonce`` makes every tenant's bytes unique.
"""

from __future__ import annotations

WAT = """
(module
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (import "tenantflow" "reply" (func $reply (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{step}")
  (data (i32.const 256) "{result}")
  (data (i32.const 512) "{finish}")
  (data (i32.const 768) "tenant {nonce}")
  (func $send (param i32 i32) (drop (call $call (local.get 0) (local.get 1))) (call $reply (i32.const 4096)))
  (func (export "workflow_{workflow}") (local $i i32)
    (loop $l
      (call $send (i32.const 0) (i32.const {step_len}))
      (call $send (i32.const 256) (i32.const {result_len}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {steps}))))
    (call $send (i32.const 512) (i32.const {finish_len}))))
"""


def loop_module(workflow: str, steps: int, nonce: object, output: str) -> str:
    """WAT text of workflow class ``workflow``: ``steps`` steps, then finish with JSON ``output``."""
    messages = {
        "step": '{"op":"step","kind":"do","name":"s"}',
        "result": '{"op":"result","ok":true,"value":1}',
        "finish": '{"op":"finish","ok":true,"value":' + output + "}",
    }
    return WAT.format(
        **{k: v.replace('"', '\\"') for k, v in messages.items()},
        **{f"{k}_len": len(v) for k, v in messages.items()},
        workflow=workflow, steps=steps, nonce=nonce,
    )  # fmt: skip
