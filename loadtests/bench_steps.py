"""Durable step throughput and cold start, against a real kernel on embedded SQLite.

Prints: steps/s for one instance running sequential steps, steps/s with 50 concurrent instances
(group commit at work), and Create -> first step running for never-seen tenants (p50/p99).
Run: `.venv/bin/python loadtests/bench_steps.py [--steps 2000] [--instances 50]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

from tenantflow.client import Client  # noqa: E402

LOOP = """
from tenantflow.workflow import WorkflowEntrypoint

class Loop(WorkflowEntrypoint):
    async def run(self, event, step):
        total = 0
        for i in range(event.payload["steps"]):
            total += await step.do(f"s{i}", lambda i=i: i)
        return total
"""


def epoch(at: str) -> float:
    return dt.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def throughput(client: Client, tenant: str, ref: str, instances: int, steps: int) -> float:
    started = time.perf_counter()
    ids = [client.create(tenant, "Loop", ref, params={"steps": steps}).id for _ in range(instances)]
    for n, id in enumerate(ids, 1):
        done = client.wait(tenant, id, timeout=600)
        assert Client.output(done) == sum(range(steps)), done
        if sys.stderr.isatty():
            print(f"\r  {n}/{instances} instances complete", end="", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return instances * steps / elapsed


def cold_starts(client: Client, count: int) -> list[float]:
    """Seconds from Create to the first step starting, each for a tenant the kernel never saw."""
    latencies = []
    for n in range(count):
        tenant = f"cold{n}-{time.time_ns()}"
        ref = client.publish(tenant, "loop", {"wf.py": LOOP}).ref
        sent = time.time()
        inst = client.create(tenant, "Loop", ref, params={"steps": 1})
        client.wait(tenant, inst.id)
        started = next(e for e in client.watch(tenant, inst.id) if e.kind == "step_started")
        latencies.append(epoch(started.at) - sent)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="steps in the single-instance run")
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument(
        "--steps-each", type=int, default=200, help="steps per instance in the concurrent run"
    )
    parser.add_argument("--cold", type=int, default=30, help="never-seen tenants for the cold-start figure")
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    args = parser.parse_args()
    kernel = BenchKernel("--max-concurrent", str(max(64, args.instances)), synchronous=args.synchronous)
    try:
        with Client(kernel.address, timeout=600) as client:
            ref = client.publish("bench", "loop", {"wf.py": LOOP}).ref
            client.wait("bench", client.create("bench", "Loop", ref, params={"steps": 10}).id)  # warm up
            print(f"storage: SQLite WAL, synchronous={args.synchronous}; kernel {kernel.address}", flush=True)
            one = throughput(client, "bench", ref, 1, args.steps)
            print(f"1 instance, {args.steps} sequential steps:      {one:8.0f} durable steps/s", flush=True)
            many = throughput(client, "bench", ref, args.instances, args.steps_each)
            print(
                f"{args.instances} concurrent instances x {args.steps_each} steps: {many:8.0f} durable steps/s",
                flush=True,
            )
            lat = sorted(cold_starts(client, args.cold))
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"Create -> first step running, never-seen tenant: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
                  f"({args.cold} tenants)")  # fmt: skip
            print(f"kernel RSS after the run: {kernel.rss_mib():.0f} MiB")
    finally:
        kernel.stop()


if __name__ == "__main__":
    main()
