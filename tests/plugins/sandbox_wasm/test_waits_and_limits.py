"""Guest waits the kernel can interrupt, and store limits that bound a run as a whole (in process)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import pytest

from tenantflow.kernel.sandbox import CodeError, Limits, RunExit
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox
from tests.plugins.sandbox_wasm.conftest import ScriptedHost, job, run

MIB = 1024 * 1024

# A raw guest that sleeps through WASI poll_oneoff: one clock subscription (userdata 7) at 1024,
# events at 2048, the event count at 3000; a clock_time_get result at 3008.
_SLEEPER = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $now (param i32 i64 i32) (result i32)))
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{\\"op\\":\\"finish\\",\\"ok\\":true,\\"value\\":1}")
  (func $sleep (param $timeout i64) (param $flags i32)
    (i64.store (i32.const 1024) (i64.const 7))
    (i32.store8 (i32.const 1032) (i32.const 0))
    (i32.store (i32.const 1040) (i32.const 1))
    (i64.store (i32.const 1048) (local.get $timeout))
    (i64.store (i32.const 1056) (i64.const 0))
    (i32.store16 (i32.const 1064) (local.get $flags))
    (if (call $poll (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 3000)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 3000)) (i32.const 1)) (then unreachable))
    (if (i64.ne (i64.load (i32.const 2048)) (i64.const 7)) (then unreachable))
    (if (i32.load16_u (i32.const 2056)) (then unreachable)))
  (func $finish (drop (call $call (i32.const 16) (i32.const 35))))
  (func (export "workflow_Nap") (call $sleep (i64.const 30000000) (i32.const 0)) (call $finish))
  (func (export "workflow_Until")
    (if (call $now (i32.const 1) (i64.const 0) (i32.const 3008)) (then unreachable))
    (call $sleep (i64.add (i64.load (i32.const 3008)) (i64.const 30000000)) (i32.const 1))
    (call $finish))
  (func (export "workflow_Hour") (call $sleep (i64.const 3600000000000) (i32.const 0)) (call $finish)))
"""

_PY_WAITS = b"""
import select, time
from tenantflow.workflow import WorkflowEntrypoint

def _waits():
    t = time.monotonic(); time.sleep(0.05); slept = time.monotonic() - t
    t = time.monotonic(); ready = select.select([], [], [], 0.05); selected = time.monotonic() - t
    poller = select.poll(); t = time.monotonic(); poller.poll(50); polled = time.monotonic() - t
    return [slept >= 0.05, selected >= 0.05, polled >= 0.05, ready == ([], [], [])]

class Waits(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("waits", _waits)

class Hour(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("nap", lambda: time.sleep(3600))

class Select(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("nap", lambda: select.select([], [], [], 3600))
"""


def _guest_threads() -> list[str]:
    """Threads running guests (one per run), not the epoch ticker."""
    return [t.name for t in threading.enumerate() if re.fullmatch(r"tenantflow-(python-)?wasm-\d+", t.name)]


def _cancel_while_waiting(sandbox: Any, the_job: dict[str, Any]) -> float:
    """Start a run, cancel it 0.5 s in (as a step time-out or terminate does); return how long the
    cancelled run took to return."""

    async def go() -> float:
        task = asyncio.create_task(sandbox.run(the_job, ScriptedHost(), Limits()))
        await asyncio.sleep(0.5)
        assert not task.done(), task.result()
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    return asyncio.run(go())


def _wait_threads_gone(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _guest_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _guest_threads(), _guest_threads()


def test_raw_poll_oneoff_sleeps_relative_and_absolute(raw_wasm: RawWasmSandbox) -> None:
    files = {"s.wat": _SLEEPER.encode()}
    for workflow in ("Nap", "Until"):
        started = time.monotonic()
        exit_, host, _ = run(raw_wasm, job(files, "s.wat", workflow))
        assert exit_ == RunExit(False), exit_
        assert time.monotonic() - started >= 0.03
        assert host.calls[-1]["op"] == "finish"


def test_raw_sleep_ends_at_the_wall_limit_and_on_cancellation(raw_wasm: RawWasmSandbox) -> None:
    files = {"s.wat": _SLEEPER.encode()}
    started = time.monotonic()
    exit_, _, _ = run(raw_wasm, job(files, "s.wat", "Hour"), Limits(wall_seconds=0.5))
    assert exit_.crashed and "wall-clock limit exceeded (0.5 s per run)" in exit_.detail
    assert time.monotonic() - started < 5.0  # generous: 0.5 s plus a busy machine
    assert _cancel_while_waiting(raw_wasm, job(files, "s.wat", "Hour")) < 1.0
    _wait_threads_gone()


def test_python_wasm_sleep_select_and_poll_wait_as_asked(python_wasm: PythonWasmSandbox) -> None:
    exit_, host, _ = run(python_wasm, job({"wf.py": _PY_WAITS}, "wf", "Waits"))
    assert exit_ == RunExit(False), exit_
    assert host.calls[-1] == {"op": "finish", "ok": True, "value": [True, True, True, True]}


@pytest.mark.parametrize("workflow", ["Hour", "Select"])
def test_python_wasm_long_waits_end_at_the_wall_limit_and_on_cancellation(
    python_wasm: PythonWasmSandbox, workflow: str
) -> None:
    the_job = job({"wf.py": _PY_WAITS}, "wf", workflow)
    exit_, _, _ = run(python_wasm, the_job, Limits(wall_seconds=1.0))
    assert exit_.crashed and "wall-clock limit exceeded (1 s per run)" in exit_.detail
    assert _cancel_while_waiting(python_wasm, the_job) < 1.0
    _wait_threads_gone()


@pytest.mark.parametrize(
    ("wat", "says"),
    [
        ('(memory (export "memory") 1) (memory 7600)', "multiple memories"),
        ('(memory (export "memory") i64 1)', "memory64"),
        ('(memory (export "memory") 1 1 shared)', "threads"),
        ('(memory (export "memory") 1) (type (struct))', "gc"),
    ],
)
def test_publish_refuses_features_the_abi_does_not_need(
    raw_wasm: RawWasmSandbox, wat: str, says: str
) -> None:
    files = {"m.wat": f'(module {wat} (func (export "workflow_W")))'.encode()}
    with pytest.raises(CodeError, match=f"(?i)m.wat: not a valid WebAssembly module: .*{re.escape(says)}"):
        raw_wasm.inspect(files)
    with pytest.raises(CodeError):  # and a run never gets further, whatever was cached before
        run(raw_wasm, job(files, "m.wat", "W"))


_FINISH = """
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (data (i32.const 16) "{\\"op\\":\\"finish\\",\\"ok\\":true,\\"value\\":1}")
  (func $finish (drop (call $call (i32.const 16) (i32.const 35))))
"""


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('(memory (export "memory") 1) (table 100000000 funcref) (func (export "workflow_W"))',
         "table minimum size of 100000000 elements exceeds table limits"),
        ('(memory (export "memory") 1) (table 1 funcref) (table 1 funcref) (table 1 funcref)'
         ' (func (export "workflow_W"))', "table count too high"),
        ('(memory (export "memory") 1000) (func (export "workflow_W"))',
         "memory minimum size of 1000 pages exceeds memory limits"),
    ],
)  # fmt: skip
def test_store_limits_fail_the_run_with_a_clear_error(raw_wasm: RawWasmSandbox, body: str, says: str) -> None:
    files = {"m.wat": f"(module {body})".encode()}
    raw_wasm.inspect(files)  # valid modules: only their size is refused, when they start
    exit_, _, _ = run(raw_wasm, job(files, "m.wat", "W"), Limits(memory_bytes=32 * MIB))
    assert exit_.crashed and says in exit_.detail, exit_


def test_tables_and_memory_stop_growing_at_the_limits(raw_wasm: RawWasmSandbox) -> None:
    wat = f"""(module {_FINISH}
      (memory (export "memory") 1) (table 1 funcref)
      (func (export "workflow_W")
        ;; both grows must fail (-1): 2 Mi table elements, 33 MiB of memory past a 32 MiB cap
        (if (i32.ne (table.grow (ref.null func) (i32.const 2097152)) (i32.const -1)) (then unreachable))
        (if (i32.ne (memory.grow (i32.const 528)) (i32.const -1)) (then unreachable))
        (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))  ;; 1 MiB is fine
        (call $finish)))"""
    files = {"m.wat": wat.encode()}
    exit_, host, _ = run(raw_wasm, job(files, "m.wat", "W"), Limits(memory_bytes=32 * MIB))
    assert exit_ == RunExit(False), exit_
    assert host.calls[-1]["op"] == "finish"
