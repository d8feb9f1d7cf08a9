"""Cold start and step throughput of every sandbox: subprocess, python-wasm, wasm.

    .venv/bin/python loadtests/bench_sandboxes.py [--runs 200] [--steps 1000]

Measures the sandboxes in-process against a host that answers at once (no storage, no gRPC), so
the numbers are the sandbox's own cost:

- cold start: from ``sandbox.run()`` to the guest's first step request, for tenant code the
  sandbox has never seen (every run gets different source / a different module). For raw wasm
  the module was published first (Publish compiles it; that time is reported separately);
- run: a whole one-step run, start to finish;
- steps/s: one run doing ``--steps`` sequential steps.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenantflow.kernel.sandbox import Limits, Sandbox
from tenantflow.plugins.sandbox_subprocess.sandbox import SubprocessSandbox
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox

sys.path.insert(0, str(Path(__file__).parent))
from _rawloop import loop_module  # noqa: E402

PYTHON = """
from tenantflow.workflow import WorkflowEntrypoint
# tenant {nonce}
class Bench(WorkflowEntrypoint):
    def run(self, event, step):
        for i in range(event.payload["steps"]):
            step.do("s", lambda: i)
        return "done"
"""


def wat(nonce: int, steps: int) -> bytes:
    return loop_module("Bench", steps, nonce, output='"done"').encode()


class BenchHost:
    """Answers every request at once; notes when the first one arrived."""

    def __init__(self) -> None:
        self.first = 0.0

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if not self.first:
            self.first = time.perf_counter()
        if message["op"] == "step":
            return {"do": "run", "attempt": 1}
        if message["op"] == "result":
            return {"do": "return", "value": message.get("value")}
        return {"do": "ack"}

    def admit(self, size: int) -> bool:
        return True

    async def notify(self, message: dict[str, Any]) -> None:
        pass


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(
    sandbox: Sandbox, files: Callable[[int], dict[str, bytes]], module: str, runs: int, steps: int
) -> dict[str, float]:
    limits = Limits(cpu_seconds=60, memory_bytes=256 * 1024 * 1024)
    cold, total, publish = [], [], []
    for nonce in range(runs):
        bundle = files(nonce)
        started = time.perf_counter()
        sandbox.inspect(bundle)  # what Code.Publish does
        publish.append(time.perf_counter() - started)
        host = BenchHost()
        job = {"files": bundle, "module": module, "workflow": "Bench", "journal": [],
               "event": {"payload": {"steps": 1}, "instance_id": f"i{nonce}", "timestamp": "2025-01-01T00:00:00+00:00"}}  # fmt: skip
        started = time.perf_counter()
        exit_ = await sandbox.run(job, host, limits)
        total.append(time.perf_counter() - started)
        cold.append(host.first - started)
        assert not exit_.crashed, exit_
    bundle = files(runs + 1 if module.endswith(".wat") else 0)
    if module.endswith(".wat"):
        bundle = {module: wat(-1, steps)}
        sandbox.inspect(bundle)
    job = {"files": bundle, "module": module, "workflow": "Bench", "journal": [],
           "event": {"payload": {"steps": steps}, "instance_id": "many", "timestamp": "2025-01-01T00:00:00+00:00"}}  # fmt: skip
    started = time.perf_counter()
    exit_ = await sandbox.run(job, BenchHost(), limits)
    elapsed = time.perf_counter() - started
    assert not exit_.crashed, exit_
    ms = 1000.0
    return {"cold_p50_ms": pct(cold, 50) * ms, "cold_p99_ms": pct(cold, 99) * ms,
            "run_p50_ms": pct(total, 50) * ms, "run_p99_ms": pct(total, 99) * ms,
            "publish_p50_ms": statistics.median(publish) * ms, "steps_per_s": steps / elapsed}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()

    def python_files(nonce: int) -> dict[str, bytes]:
        return {"wf.py": PYTHON.format(nonce=nonce).encode()}

    python_wasm = PythonWasmSandbox(4)
    await asyncio.to_thread(
        python_wasm.runner
    )  # built/compiled once per machine; "after the interpreter is warm"
    subjects: list[tuple[str, Sandbox, Callable[[int], dict[str, bytes]], str]] = [
        ("subprocess", SubprocessSandbox(), python_files, "wf"),
        ("python-wasm", python_wasm, python_files, "wf"),
        ("wasm", RawWasmSandbox(4), lambda n: {"bench.wat": wat(n, 1)}, "bench.wat"),
    ]
    header = f"{'sandbox':<12} {'cold p50':>9} {'cold p99':>9} {'run p50':>9} {'run p99':>9} {'publish':>9} {'steps/s':>9}"
    print(f"{args.runs} never-seen tenants each, then one run of {args.steps} steps (times in ms)")
    print(header)
    for name, sandbox, files, module in subjects:
        await sandbox.start()
        try:
            r = await measure(sandbox, files, module, args.runs, args.steps)
        finally:
            await sandbox.close()
        print(f"{name:<12} {r['cold_p50_ms']:>9.2f} {r['cold_p99_ms']:>9.2f} {r['run_p50_ms']:>9.2f} "
              f"{r['run_p99_ms']:>9.2f} {r['publish_p50_ms']:>9.2f} {r['steps_per_s']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
