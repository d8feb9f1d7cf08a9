"""The python-wasm runner on wasmtime's pooling allocator: slots are reused, guarantees are not."""

from __future__ import annotations

import asyncio
import time

from tenantflow.kernel.sandbox import Limits
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import POOL_RUNS, shared_engine
from tests.helpers import source
from tests.plugins.sandbox_wasm.conftest import ScriptedHost, job, run

WORKFLOW = source("""
    import json
    import time
    from tenantflow.workflow import WorkflowEntrypoint

    class Grow(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("grow", lambda: len(bytearray(event.payload << 20)))

    class Leave(WorkflowEntrypoint):
        def run(self, event, step):
            seen = getattr(json, "left_behind", None)
            json.left_behind = event.payload
            return seen

    class Spin(WorkflowEntrypoint):
        def run(self, event, step):
            while True:
                pass

    class Nap(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("nap", lambda: time.sleep(event.payload) or "rested")
""").encode()


def test_the_runner_uses_the_pooled_engine_and_raw_modules_do_not(python_wasm: PythonWasmSandbox) -> None:
    assert python_wasm.runner().engine is shared_engine(pooling=True)[0]
    assert shared_engine(pooling=True)[0] is not shared_engine()[0]


def test_each_runs_memory_limit_holds_exactly_on_pooled_slots(python_wasm: PythonWasmSandbox) -> None:
    small = Limits(memory_bytes=64 * 1024 * 1024)
    exit_, host, _ = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Grow", payload=80), small)
    results = [m for m in host.calls if m["op"] == "result"]
    assert results and not results[0]["ok"] and results[0]["error"]["name"] == "MemoryError", host.calls
    # the same slot size, a larger limit: the store's limit decides, not the pool's
    exit_, host, _ = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Grow", payload=80))
    assert not exit_.crashed and host.calls[-1] == {"op": "finish", "ok": True, "value": 80 << 20}


def test_nothing_of_a_run_survives_into_the_next_on_a_reused_slot(python_wasm: PythonWasmSandbox) -> None:
    for n in range(POOL_RUNS + 2):  # sequential runs reuse slots: a slot not given back fails a run
        exit_, host, _ = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Leave", payload=f"secret-{n}"))
        assert not exit_.crashed and host.calls[-1] == {"op": "finish", "ok": True, "value": None}


def test_runs_beyond_the_pool_run_on_demand(python_wasm: PythonWasmSandbox) -> None:
    python_wasm.runner()

    async def scenario() -> list[ScriptedHost]:
        hosts = [ScriptedHost() for _ in range(POOL_RUNS + 2)]
        the_job = job({"wf.py": WORKFLOW}, "wf", "Nap", payload=0.3)  # long enough that all overlap
        exits = await asyncio.gather(*(python_wasm.run(the_job, host, Limits()) for host in hosts))
        assert not any(e.crashed for e in exits), exits
        return hosts

    started = time.monotonic()
    hosts = asyncio.run(scenario())
    assert all(h.calls[-1] == {"op": "finish", "ok": True, "value": "rested"} for h in hosts)
    assert time.monotonic() - started < 0.3 * (POOL_RUNS + 2)  # at once, not queued for a slot


def test_a_trapped_run_gives_its_slot_back_at_once(python_wasm: PythonWasmSandbox) -> None:
    for _ in range(POOL_RUNS + 2):  # a trap's traceback holds the store: it is closed, not left to it
        exit_, _, _ = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Spin"), Limits(cpu_seconds=0.05))
        assert exit_.crashed and "CPU limit exceeded" in exit_.detail, exit_
