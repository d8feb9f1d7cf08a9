"""Where a python-wasm wake-up's CPU goes (issue 23, P4): an in-process split, in CPU time.

Runs the P4 workflow (one ``do`` step, then a 30-day sleep: into hibernation) through the real
:class:`PythonWasmSandbox` against a host that answers at once (no storage, no gRPC), ``--runs``
times, each run a never-seen tenant (its own source), and prints the CPU per wake-up split:

- on the guest's thread (``time.thread_time``, timestamps taken at the sandbox's own boundaries):
  store setup, ``linker.instantiate`` of the runner, guest start-up up to the module's first line
  (job decode, installing the tenant's files, compiling its module), the module's body, the
  runtime's set-up up to the first host call, the guest between host calls (step callbacks, the
  runtime, JSON), the guest thread's share of the host calls (thread hand-offs), and the tail
  (the guest returning, the store's teardown);
- job decode alone: ``run`` of a probe job of the same size minus an empty one;
- the event loop's thread and the epoch ticker's (``/proc/self/task/<tid>/schedstat``), and the
  whole process (``time.process_time``, ``resource.getrusage``: user / system, page faults).

CPU, not wall time: the machine is shared, and a busy one slows a run without inflating these.

    .venv/bin/python loadtests/bench_python_wasm.py [--runs 300] [--returning] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench_wakeups import CODE as P4_CODE  # loadtests/ is this script's directory

from tenantflow.kernel.sandbox import Limits
from tenantflow.plugins.sandbox_wasm import bridge as bridge_module
from tenantflow.plugins.sandbox_wasm import python_wasm

# The P4 workflow as bench_wakeups.py runs it, between two lines that mark where the module's body
# starts and ends (a log notification the harness times and the host drops).
CODE = (
    "\nfrom wit_world import notify as _mark\n"
    """_mark('{{"op": "log", "stream": "mark", "line": "body"}}')"""
    + P4_CODE
    + """_mark('{{"op": "log", "stream": "mark", "line": "end"}}')\n"""
)
PHASES = ("store setup", "instantiate", "start-up", "module body", "runtime set-up", "guest between calls",
          "host calls (guest thread)", "tail + teardown")  # fmt: skip


class Host:
    """The kernel's answers for the P4 workflow, at once: run the step, suspend at the sleep."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.ops.append(message["op"])
        if message["op"] == "step":
            return {"do": "run", "attempt": 1} if message["kind"] == "do" else {"do": "suspend"}
        if message["op"] == "result":
            return {"do": "return", "value": message.get("value")}
        return {"do": "ack"}

    def admit(self, size: int) -> bool:
        return True

    async def notify(self, message: dict[str, Any]) -> None:
        pass


class Timeline:
    """``time.thread_time()`` stamps taken on the guest's thread, by label."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float]] = []

    def mark(self, label: str) -> None:
        self.stamps.append((label, time.thread_time()))

    def split(self) -> dict[str, float]:
        """Seconds per phase of one run."""
        at = dict.fromkeys(PHASES, 0.0)
        last_label, last = self.stamps[0]
        seen_call = False
        for label, t in self.stamps[1:]:
            span = t - last
            if label == "instantiated":
                at["instantiate"] += span
            elif label == "instantiating":
                at["store setup"] += span
            elif label == "mark:body":
                at["start-up"] += span
            elif label == "mark:end":
                at["module body"] += span
            elif label == "call-in":
                key = "guest between calls" if seen_call else "runtime set-up"
                at[key] += span
                seen_call = True
            elif label == "call-out":
                at["host calls (guest thread)"] += span
            elif label == "note-out" or label == "note-in":
                at["host calls (guest thread)" if label == "note-out" else "guest between calls"] += span
            elif label == "done":
                at["tail + teardown"] += span
            last_label, last = label, t
        del last_label
        return at


_local = threading.local()


def _timeline() -> Timeline | None:
    return getattr(_local, "timeline", None)


def _stamp(label: str) -> None:
    if (timeline := _timeline()) is not None:
        timeline.mark(label)


@contextmanager
def instrumented(runner: python_wasm.Runner) -> Iterator[None]:
    """Stamp the guest thread at the sandbox's own boundaries (wrapping, not copying, them)."""
    originals: dict[tuple[Any, str], Any] = {}

    def wrap(owner: Any, name: str, before: str, after: str) -> None:
        fn = getattr(owner, name)
        originals[(owner, name)] = fn

        def timed(*args: Any, **kwargs: Any) -> Any:
            _stamp(before)
            try:
                return fn(*args, **kwargs)
            finally:
                _stamp(after)

        setattr(owner, name, timed)

    # the pooled build and the spare (a runner before them: itself)
    builds = list(
        {id(b): b for b in (getattr(runner, "pooled", runner), getattr(runner, "spare", runner))}.values()
    )
    restore: list[tuple[Any, Any]] = []
    for build in builds:
        linker_instantiate = build.linker.instantiate
        restore.append((build.linker, linker_instantiate))

        def instantiate(
            store: Any, component: Any, build: Any = build, original: Any = linker_instantiate
        ) -> Any:
            if component is not build.component:
                return original(store, component)  # the waits helper: part of the store's setup
            _stamp("instantiating")
            try:
                return original(store, component)
            finally:
                _stamp("instantiated")

        build.linker.instantiate = instantiate
    for name in ("call_text", "send_text", "receive_text"):
        if hasattr(bridge_module.Bridge, name):
            wrap(bridge_module.Bridge, name, "call-in", "call-out")
    notify_text = bridge_module.Bridge.notify_text

    def notify(self: bridge_module.Bridge, data: str) -> None:
        if '"stream": "mark"' in data:
            _stamp("mark:" + json.loads(data)["line"])
            return
        _stamp("note-in")
        try:
            notify_text(self, data)
        finally:
            _stamp("note-out")

    bridge_module.Bridge.notify_text = notify  # type: ignore[method-assign]
    invoke = runner.invoke

    def timed_invoke(*args: Any, **kwargs: Any) -> Any:
        _local.timeline = Timeline()
        _stamp("start")
        try:
            return invoke(*args, **kwargs)
        finally:
            _stamp("done")
            timelines.append(_local.timeline)
            _local.timeline = None

    runner.invoke = timed_invoke  # type: ignore[method-assign]
    try:
        yield
    finally:
        runner.invoke = invoke  # type: ignore[method-assign]
        for linker, original in restore:
            linker.instantiate = original
        bridge_module.Bridge.notify_text = notify_text  # type: ignore[method-assign]
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)


timelines: list[Timeline] = []


def thread_cpu(name_prefix: str) -> float:
    """CPU seconds of the live threads whose name starts with ``name_prefix`` (Linux schedstat)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(name_prefix) and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except OSError:
                pass
    return total


def job(tenant: str, rnd: int) -> dict[str, Any]:
    files = {"wake.py": CODE.format(tenant=tenant).encode()}
    event = {"payload": {"n": rnd}, "instance_id": f"r{rnd}", "timestamp": "2026-12-07T00:00:00+00:00"}
    return {
        "files": files,
        "module": "wake",
        "workflow": "Idle",
        "event": event,
        "journal": [],
        "ahead": True,
    }


def decode_cost(runner: python_wasm.Runner, size: int, runs: int) -> float:
    """CPU seconds the guest spends decoding a job of ``size`` bytes (probe jobs, guest thread)."""

    def probe(pad: str) -> float:
        text = json.dumps({"probe": True, "pad": pad})
        took = []
        for _ in range(runs):
            started = time.thread_time()
            runner.invoke(text, 256 * 1024 * 1024, None)
            took.append(time.thread_time() - started)
        return statistics.median(took)

    return max(0.0, probe("x" * size) - probe(""))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--returning", action="store_true", help="every run the same tenant's code")
    parser.add_argument("--concurrency", type=int, default=1, help="runs at once (the kernel runs several)")
    args = parser.parse_args()
    sandbox = python_wasm.PythonWasmSandbox(4)
    runner = await asyncio.to_thread(sandbox.runner)
    limits = Limits(cpu_seconds=60, memory_bytes=256 * 1024 * 1024)
    for warm in range(20):  # warm the paths (and any per-code cache) before measuring
        await sandbox.run(job(f"warm-{warm}", 0), Host(), limits)
    loop_thread = threading.current_thread()
    loop_id = loop_thread.native_id
    ticker0, proc0, usage0 = thread_cpu("tenantflow-wasm-epoch"), time.process_time(), resource.getrusage(0)
    with open(f"/proc/self/task/{loop_id}/schedstat") as f:
        loop0 = int(f.read().split()[0]) / 1e9

    async def one(n: int) -> None:
        tenant = "returning" if args.returning else f"tenant-{n}-{time.time_ns()}"
        host = Host()
        exit_ = await sandbox.run(job(tenant, n), host, limits)
        assert not exit_.crashed, exit_
        assert host.ops[-1] == "suspend", host.ops

    with instrumented(runner):
        for first in range(0, args.runs, args.concurrency):
            await asyncio.gather(*(one(n) for n in range(first, min(args.runs, first + args.concurrency))))
    with open(f"/proc/self/task/{loop_id}/schedstat") as f:
        loop1 = int(f.read().split()[0]) / 1e9
    ticker = thread_cpu("tenantflow-wasm-epoch") - ticker0
    proc, usage1 = time.process_time() - proc0, resource.getrusage(0)
    runs = args.runs
    splits = [t.split() for t in timelines]
    size = len(json.dumps({**job("tenant-0-0", 0), "files": {"wake.py": CODE}}))
    decode = await asyncio.to_thread(decode_cost, runner, size, 50)
    ms = 1000.0
    guest_total = sum(sum(s.values()) for s in splits) / runs
    print(f"python-wasm wake-up into hibernation, {runs} runs ({'returning' if args.returning else 'never-seen'} "
          f"tenants, {args.concurrency} at once), CPU ms per wake-up (mean; median in brackets)")  # fmt: skip
    for phase in PHASES:
        values = [s[phase] for s in splits]
        print(f"  {phase:<28} {statistics.mean(values) * ms:7.3f}  [{statistics.median(values) * ms:.3f}]")
    print(f"  {'(of start-up: job decode)':<28} {decode * ms:7.3f}")
    print(f"  {'guest thread, total':<28} {guest_total * ms:7.3f}")
    print(f"  {'event loop thread':<28} {(loop1 - loop0) / runs * ms:7.3f}")
    print(f"  {'epoch ticker thread':<28} {ticker / runs * ms:7.3f}")
    user = (usage1.ru_utime - usage0.ru_utime) / runs * ms
    system = (usage1.ru_stime - usage0.ru_stime) / runs * ms
    faults = (usage1.ru_minflt - usage0.ru_minflt) / runs
    print(f"  {'process':<28} {proc / runs * ms:7.3f}  (user {user:.3f} + system {system:.3f}; "
          f"{faults:,.0f} minor faults)")  # fmt: skip
    with open("/proc/self/status") as f:
        rss = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    print(f"  {'process RSS after the runs':<28} {int(rss) / 1024:7.0f} MiB")
    await sandbox.close()


if __name__ == "__main__":
    asyncio.run(main())
