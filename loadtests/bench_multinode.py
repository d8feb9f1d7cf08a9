"""Several kernel nodes over one storage: durable steps/s and Create/s with 1, 2 and 3 nodes, and
how long a SIGKILLed node's instances wait before another node runs them again.

Prints one table row per node count. Every configuration gets a storage of its own: ``{dir}`` in
``--storage`` stands for a fresh directory (the default is one SQLite file in it; pass another
engine's URL, e.g. ``fdb://`` or an ordered-KV URL, to measure that engine the same way).
Run: `.venv/bin/python loadtests/bench_multinode.py [--nodes 1,2,3] [--storage URL]`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tenantflow.client import Client
from tenantflow.kernel.cli import table

LOOP = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Loop(WorkflowEntrypoint):
    async def run(self, event, step):
        total = 0
        for i in range(event.payload["steps"]):
            def work(i=i):
                time.sleep(event.payload["pause"])
                return i
            total += await step.do(f"s{i}", work)
        return total

class Nap(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("nap", "1 hour")
"""


class Node:
    """A ``tenantflow serve`` process with its own node id and data dir over the shared storage."""

    def __init__(self, name: str, storage: str, data_dir: Path, lease_seconds: float) -> None:
        self.name = name
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "kernel.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
                 "--data-dir", str(data_dir), "--storage", storage, "--node-id", name,
                 "--lease-seconds", str(lease_seconds), "--tenant-create-rate", "0"],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.address = ""
        for line in self.proc.stdout:
            if "listening on" in line:
                self.address = line.split("listening on ")[1].split()[0]
                break
        if not self.address:
            raise SystemExit(f"node {name} did not start; see {self.log_path}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout or ()], daemon=True).start()
        self.client = Client(self.address)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def steps_per_second(nodes: list[Node], tenant: str, ref: str, instances: int, steps: int) -> float:
    """Trivial steps of ``instances`` instances created round-robin over the nodes, start to end."""
    started = time.perf_counter()
    ids = [nodes[n % len(nodes)].client.create(tenant, "Loop", ref, params={"steps": steps, "pause": 0}).id
           for n in range(instances)]  # fmt: skip
    for n, id in enumerate(ids):
        done = nodes[n % len(nodes)].client.wait(tenant, id, timeout=600)
        assert Client.output(done) == sum(range(steps)), done
    return instances * steps / (time.perf_counter() - started)


def creates_per_second(nodes: list[Node], tenant: str, ref: str, count: int, threads: int) -> float:
    """Create calls spread over the nodes from ``threads`` callers; each instance then hibernates."""
    turn = itertools.count()

    def create(_: int) -> None:
        node = nodes[next(turn) % len(nodes)]
        node.client.create(tenant, "Nap", ref)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(count)))
    return count / (time.perf_counter() - started)


def progress(client: Client, tenant: str, id: str) -> int:
    """Grows whenever a step attempt starts or completes."""
    steps = client.get(tenant, id).steps
    return sum(s.attempts for s in steps) + sum(s.status == "complete" for s in steps)


def takeover_seconds(nodes: list[Node], tenant: str, ref: str, instances: int) -> tuple[float, int]:
    """SIGKILL the last node while every instance runs slow steps; seconds until each instance has
    started a step again, and how many the dead node was running (they are the slowest)."""
    params = {"steps": 10_000, "pause": 0.1}
    ids = [
        nodes[n % len(nodes)].client.create(tenant, "Loop", ref, params=params).id for n in range(instances)
    ]
    live = nodes[0].client
    deadline = time.monotonic() + 60
    while any(not live.get(tenant, id).steps for id in ids):  # every instance is running
        if time.monotonic() > deadline:
            raise SystemExit("instances did not all start within 60 s")
        time.sleep(0.05)
    time.sleep(1.0)
    at_kill = {id: progress(live, tenant, id) for id in ids}
    nodes[-1].kill()
    killed = time.monotonic()
    waiting = set(ids)
    stalled_after_1s = 0
    while waiting:
        waiting = {id for id in waiting if progress(live, tenant, id) <= at_kill[id]}
        if not stalled_after_1s and time.monotonic() - killed >= 1.0:
            stalled_after_1s = len(waiting)  # the dead node's instances (the others moved on at once)
        if time.monotonic() - killed > 120:
            raise SystemExit(f"{len(waiting)} instances never ran again after the kill")
        time.sleep(0.02)
    elapsed = time.monotonic() - killed
    for id in ids:
        live.terminate(tenant, id)
    return elapsed, stalled_after_1s


def run(count: int, storage_template: str, args: argparse.Namespace) -> list[str]:
    root = Path(tempfile.mkdtemp(prefix=f"tenantflow-multinode-{count}-"))
    storage = storage_template.replace("{dir}", str(root))
    with ThreadPoolExecutor(count) as pool:
        nodes = list(pool.map(lambda n: Node(f"n{n + 1}", storage, root / f"n{n + 1}", args.lease_seconds),
                              range(count)))  # fmt: skip
    try:
        tenant = f"bench{count}-{os.getpid()}"
        ref = nodes[0].client.publish(tenant, "loop", {"wf.py": LOOP}).ref
        warm = [
            nodes[n].client.create(tenant, "Loop", ref, params={"steps": 2, "pause": 0}).id
            for n in range(count)
        ]
        for n, id in enumerate(warm):  # every node has loaded the code and started its sandbox
            nodes[n].client.wait(tenant, id, timeout=120)
        steps = steps_per_second(nodes, tenant, ref, args.instances, args.steps)
        creates = creates_per_second(nodes, tenant, ref, args.creates, args.threads)
        if count > 1:
            seconds, held = takeover_seconds(nodes, tenant, ref, args.takeover_instances)
            takeover = f"{seconds:.1f} s ({held} instances)"
        else:
            takeover = "-"
        return [str(count), f"{steps:,.0f}", f"{creates:,.0f}", takeover]
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3", help="node counts to measure, e.g. 1,2,3")
    parser.add_argument("--storage", default="sqlite:///{dir}/shared.sqlite3",
                        help="storage URL all nodes share; {dir} is a fresh directory per row")  # fmt: skip
    parser.add_argument("--instances", type=int, default=32, help="instances running steps at once")
    parser.add_argument("--steps", type=int, default=100, help="steps per instance")
    parser.add_argument("--creates", type=int, default=400, help="Create calls")
    parser.add_argument("--threads", type=int, default=8, help="callers making Create calls at once")
    parser.add_argument("--takeover-instances", type=int, default=24, help="instances running at the kill")
    parser.add_argument("--lease-seconds", type=float, default=6.0, help="the nodes' --lease-seconds")
    args = parser.parse_args()
    rows = [run(int(n), args.storage, args) for n in args.nodes.split(",")]
    print(f"storage {args.storage}, {os.cpu_count()} CPUs, lease {args.lease_seconds:g} s")
    print(table(rows, ["nodes", "durable steps/s", "Create/s", "takeover after SIGKILL"]))


if __name__ == "__main__":
    main()
