"""What a hibernating instance costs: no process, no kernel memory, a few KB of storage.

Creates N instances (spread over many tenants) that run one step and then sleep for an hour,
waits until every one hibernates, and prints the storage bytes per instance, the kernel's RSS
before and after, and how many sandbox processes are alive (none should be).
Run: `.venv/bin/python loadtests/bench_hibernation.py [--instances 20000] [--tenants 1000]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

from tenantflow.client import Client  # noqa: E402
from tenantflow.v1 import tenantflow_pb2 as pb  # noqa: E402

NAP = """
from tenantflow.workflow import WorkflowEntrypoint

class Nap(WorkflowEntrypoint):
    async def run(self, event, step):
        order = await step.do("accept", lambda: {"order": event.payload["n"], "state": "accepted"})
        await step.sleep("until tomorrow", "1 hour")
        return order
"""


def children(pid: int) -> int:
    """Processes whose parent is the template running a wake-up (not a spare waiting for one, nor a
    warm runner parked between its tenant's wake-ups: those go after --warm-runner-idle-seconds)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if int(stat[1]) == pid and comm not in ("tf-spare", "tf-warm"):
                count += 1
    return count


def storage_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("tenantflow.sqlite3*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=20_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    args = parser.parse_args()
    kernel = BenchKernel()
    try:
        with Client(kernel.address, timeout=120) as client:
            refs = [client.publish(f"tenant{t}", "nap", {"nap.py": NAP}).ref for t in range(args.tenants)]
            time.sleep(1)
            rss_before, bytes_before = kernel.rss_mib(), storage_bytes(kernel.data_dir)
            started = time.perf_counter()
            per_tenant = args.instances // args.tenants
            for t, ref in enumerate(refs):
                for first in range(0, per_tenant, 100):
                    batch = [
                        {"workflow": "Nap", "code": ref, "params": {"n": n}}
                        for n in range(first, min(first + 100, per_tenant))
                    ]
                    client.create_batch(f"tenant{t}", batch)
                if t % 100 == 99:
                    print(f"  created {(t + 1) * per_tenant} instances", file=sys.stderr, flush=True)
            total = per_tenant * args.tenants
            while True:
                waiting = sum(
                    1
                    for t in range(args.tenants)
                    for _ in client.iter_instances(f"tenant{t}", status=pb.STATUS_WAITING, page_size=1000)
                )
                print(f"  {waiting}/{total} hibernating", file=sys.stderr, flush=True)
                if waiting == total:
                    break
                time.sleep(2)
            elapsed = time.perf_counter() - started
            time.sleep(2)
            template = [
                p
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and b"sandbox_subprocess.zygote" in (p / "cmdline").read_bytes()
            ]
            alive = sum(children(int(p.name)) for p in template)
            grown = storage_bytes(kernel.data_dir) - bytes_before
            print(
                f"{total} instances over {args.tenants} tenants ran a step and hibernated in {elapsed:.0f} s "
                f"({total / elapsed:.0f} wake-ups/s)"
            )
            print(
                f"storage: {grown / total / 1024:.1f} KiB per hibernating instance (journal, history, envelope)"
            )
            print(
                f"kernel RSS: {rss_before:.0f} MiB before, {kernel.rss_mib():.0f} MiB with all of them hibernating"
            )
            print(f"sandbox processes alive while they hibernate: {alive}")
    finally:
        kernel.stop()


if __name__ == "__main__":
    main()
