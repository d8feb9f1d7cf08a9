"""What ``tenantflow dev run`` adds to a workflow's own running time.

    .venv/bin/python loadtests/bench_devrun.py [--runs 5] [--runtime python]

Runs the demo's CI pipeline (examples/ci_pipeline: steps that ``time.sleep`` about 1.4 s on their
critical path, a flaky step retried after a 1 s back-off, a 24-hour approval wait answered by a
scripted event) with ``tenantflow dev run`` as a user would, and compares the whole command's wall
time with the steps' own running time: the union of the intervals in which some step attempt ran,
read from the run's timeline. Durable time (the back-off, the wait) is skipped, so the difference
is the command's overhead: interpreter and kernel start, publish, the wake-ups. Target: under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tenantflow.kernel.devrun import LocalRun, ScriptedEvent, files_of
from tenantflow.kernel.model import HistoryEntry

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "ci_pipeline"
PARAMS = '{"repo": "acme/app"}'
APPROVAL = ("deploy-approval", {"approved": True, "by": "bench"})


def step_time(timeline: list[HistoryEntry]) -> float:
    """Seconds in which at least one step attempt was running (parallel attempts count once)."""
    started: dict[str, float] = {}
    spans: list[tuple[float, float]] = []
    for entry in timeline:
        if entry.kind == "step_started":
            started[entry.step] = entry.at
        elif entry.kind in ("step_completed", "step_failed") and entry.step in started:
            spans.append((started.pop(entry.step), entry.at))
    total, end = 0.0, 0.0
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


async def own_time(runtime: str) -> float:
    async with LocalRun() as run:
        ref = await run.publish(files_of(PIPELINE), runtime=runtime)
        record = await run.start("Pipeline", ref, {"repo": "acme/app"})
        outcome = await run.drive(record.id, [ScriptedEvent(*APPROVAL)])
    assert outcome.record.status.name == "COMPLETE", outcome.record
    return step_time(outcome.timeline)


def command(runtime: str) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", "dev", "run", str(PIPELINE), "--workflow", "Pipeline",
         "--params", PARAMS, "--runtime", runtime, "--event", 'deploy-approval={"approved": true, "by": "bench"}'],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"tenantflow dev run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", default="python")
    args = parser.parse_args()
    own = asyncio.run(own_time(args.runtime))
    walls = []
    for n in range(args.runs):
        walls.append(command(args.runtime))
        print(f"run {n + 1}/{args.runs}: {walls[-1]:.2f} s", flush=True)
    wall = statistics.median(walls)
    print(f"\ntenantflow dev run of the CI pipeline ({args.runtime}), {args.runs} runs")
    print(f"  steps' own running time      {own:6.2f} s  (the back-off and the 24 h wait are skipped)")
    print(f"  whole command, median        {wall:6.2f} s  (min {min(walls):.2f}, max {max(walls):.2f})")
    print(
        f"  overhead                     {wall - own:6.2f} s  (target: under 1 s) -> {'met' if wall - own < 1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
