"""Raw modules: Publish validation, the guest ABI session, traps and limits, the WAT example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tenantflow.client import Client
from tenantflow.kernel.sandbox import CodeError, Limits
from tenantflow.plugins.sandbox_wasm.abi import RawSession
from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox
from tests.plugins.sandbox_wasm.conftest import job, run

HELLO = Path(__file__).resolve().parents[3] / "examples" / "wasm" / "wat" / "hello.wat"
HOSTILE = b"""
(module
  (memory (export "memory") 1)
  (func (export "workflow_Spin") (loop $l (br $l)))
  (func (export "workflow_Bomb") (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable)
  (func (export "workflow_Deep") (call 2))
  (func (call 2)))
"""


def test_the_wat_example_runs_in_a_kernel(client: Client, tenant: str) -> None:
    ref = client.publish(tenant, "hello", {"hello.wat": HELLO.read_text()}, runtime="wasm").ref
    done = client.wait(tenant, client.create(tenant, "Hello", ref).id, timeout=30)
    assert Client.output(done) == "hello from WAT"
    assert [s.name for s in done.steps] == ["greet"]


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"a.wasm": b"\0asm", "b.wasm": b"\0asm"}, "exactly one .wasm"),
        ({"a.wasm": b"not wasm"}, "a.wasm: not a valid WebAssembly module"),
        ({"a.wat": b"(module"}, "a.wat: not valid WebAssembly text"),
        ({"a.wat": b'(module (import "env" "f" (func)) (memory (export "memory") 1))'}, "import env.f is not provided"),
        ({"a.wat": b'(module (import "tenantflow" "call" (func)) (memory (export "memory") 1))'}, "wrong signature"),
        ({"a.wat": b'(module (func (export "workflow_X")))'}, "export its linear memory as 'memory'"),
        ({"a.wat": b'(module (memory (export "memory") 1) (func (export "workflow_X") (result i32) i32.const 0))'},
         "must be a function () -> ()"),
    ],
)  # fmt: skip
def test_publish_rejects_what_cannot_run(
    raw_wasm: RawWasmSandbox, files: dict[str, bytes], says: str
) -> None:
    with pytest.raises(CodeError, match=re.escape(says)):
        raw_wasm.inspect(files)


def test_cpu_limit_and_traps(raw_wasm: RawWasmSandbox) -> None:
    files = {"h.wat": HOSTILE}
    assert raw_wasm.inspect(files) == {"Spin": "h.wat", "Bomb": "h.wat", "Deep": "h.wat"}
    exit_, _, cpu = run(raw_wasm, job(files, "h.wat", "Spin"), Limits(cpu_seconds=0.1))
    assert exit_.crashed and "CPU limit exceeded" in exit_.detail and cpu < 0.4
    exit_, _, _ = run(raw_wasm, job(files, "h.wat", "Bomb"), Limits(memory_bytes=32 * 1024 * 1024))
    assert "unreachable" in exit_.detail and "memory limit" in exit_.detail
    exit_, _, _ = run(raw_wasm, job(files, "h.wat", "Deep"))
    assert "call stack exhausted" in exit_.detail


class Kernel:
    """Records what a session sends to the kernel and answers like it."""

    def __init__(self, *replies: dict[str, Any]) -> None:
        self.sent: list[dict[str, Any]] = []
        self.replies = list(replies)

    def __call__(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(message)
        return self.replies.pop(0) if self.replies else {"do": "ack"}


def _job(journal: list[dict[str, Any]]) -> dict[str, Any]:
    return job({}, "m.wasm", "W", journal=journal)


def test_session_replays_recorded_steps_without_asking_the_kernel() -> None:
    kernel = Kernel({"do": "run", "attempt": 1}, {"do": "return", "value": 2})
    journal = [{"key": "a#0", "name": "a", "kind": "do", "status": "complete", "value": 1}]
    session = RawSession(_job(journal), kernel)
    assert session.handle(b'{"op":"step","kind":"do","name":"a"}') == b'{"do":"return","value":1}'
    assert session.handle(b'{"op":"step","kind":"do","name":"b"}') == b'{"do":"run","attempt":1}'
    assert session.handle(b'{"op":"result","ok":true,"value":2}') == b'{"do":"return","value":2}'
    assert [m["op"] for m in kernel.sent] == ["step", "result"]
    assert kernel.sent[0]["key"] == "b#0" and kernel.sent[1] == {
        "op": "result", "key": "b#0", "name": "b", "attempt": 1, "ok": True, "value": 2}  # fmt: skip


def test_session_fails_a_replay_that_changes_the_step_order() -> None:
    kernel = Kernel()
    journal = [{"key": "a#0", "name": "a", "kind": "do", "status": "complete", "value": 1}]
    session = RawSession(_job(journal), kernel)
    assert session.handle(b'{"op":"step","kind":"do","name":"z"}') == b'{"do":"exit"}'
    assert kernel.sent[0]["error"]["name"] == "NonDeterminismError" and kernel.sent[0]["fatal"] is True


def test_session_answers_bad_requests_with_raise() -> None:
    session = RawSession(_job([]), Kernel())
    assert b"no step attempt is running" in session.handle(b'{"op":"result","ok":true}')
    assert b"unknown op" in session.handle(b'{"op":"nope"}')
    assert b"ABIError" in session.handle(b"\xff")
    session.complete("W")
    assert session.finished
