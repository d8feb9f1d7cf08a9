"""Kernel RSS with many tenants' code loaded once each, then idle: the code cache must give it back.

Starts a real ``tenantflow serve``, publishes distinct code for N tenants and creates one instance per
tenant (which loads the code into the cache and runs it), then leaves the kernel idle until the cache's
idle sweep has evicted everything. Prints VmRSS of the kernel process before, at peak and after idle.

    .venv/bin/python loadtests/bench_code_cache.py [--tenants 10000] [--idle-seconds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tenantflow.client import Client

sys.path.insert(0, str(Path(__file__).parent))
from _kernel import BenchKernel  # noqa: E402


def tenant_code(i: int, kib: int) -> dict[str, bytes]:
    """A workflow module plus a helper of about ``kib`` KiB, distinct per tenant."""
    helper = "".join(
        f"CONST_{i}_{n} = {n * i!r}  # tenant {i} padding line\n" for n in range(kib * 1024 // 40)
    )
    wf = (
        "from tenantflow.workflow import WorkflowEntrypoint\nimport helper\n\n"
        f"class Flow{i % 7}(WorkflowEntrypoint):\n"
        "    async def run(self, event, step):\n"
        f"        return await step.do('one', lambda: {i})\n"
    )
    return {"wf.py": wf.encode(), "helper.py": helper.encode()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=10_000)
    p.add_argument("--code-kib", type=int, default=4, help="size of each tenant's code")
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=120.0,
        help="the kernel's code_cache_idle_seconds: longer than loading takes, so the peak holds every tenant",
    )
    p.add_argument("--workers", type=int, default=16)
    p.add_argument(
        "--cache-entries",
        type=int,
        default=0,
        help="the kernel's code_cache_entries (default 2 x tenants); "
        "1 gives a control run that shows the growth that is not the code cache's (storage, gRPC, allocator)",
    )
    args = p.parse_args()
    kernel = BenchKernel(
        "--code-cache-entries", str(args.cache_entries or args.tenants * 2),
        "--code-cache-idle-seconds", str(args.idle_seconds),
    )  # fmt: skip
    try:
        run(kernel, args)
        evictions = [line for line in kernel.log_path.read_text().splitlines() if "evicted" in line]
        print("kernel log:", *evictions, sep="\n  ")
    except Exception:
        print("kernel log (tail):", *kernel.log_path.read_text().splitlines()[-30:], sep="\n")
        raise
    finally:
        kernel.stop()


def run(kernel: BenchKernel, args: argparse.Namespace) -> None:
    address, rss_mb = kernel.address, kernel.rss_mib
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = Client(address)
        tenant = f"bench-{i:05d}"
        ref = local.client.publish(tenant, "wf", tenant_code(i, args.code_kib)).ref
        local.client.create(tenant, f"Flow{i % 7}", ref, id="only")

    one(args.tenants)  # warm every path once (an extra tenant) before the baseline
    time.sleep(1)
    before = peak = rss_mb()
    print(
        f"kernel pid {kernel.proc.pid}: RSS before {before:.1f} MiB; loading {args.tenants} tenants' code",
        flush=True,
    )
    started = time.monotonic()
    done = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for _ in pool.map(one, range(args.tenants)):
            done += 1
            if done % 1000 == 0 or done == args.tenants:
                peak = max(peak, rss_mb())
                rate = done / (time.monotonic() - started)
                print(f"  {done:>6} tenants  {rate:6.0f}/s  RSS {rss_mb():7.1f} MiB", flush=True)
    with Client(address) as client:  # every instance has run (and so used its code) before going idle
        for i in range(0, args.tenants, max(1, args.tenants // 50)):
            client.wait(f"bench-{i:05d}", "only", timeout=300)
    peak = max(peak, rss_mb())
    loaded = time.monotonic()
    print(
        f"peak RSS {peak:.1f} MiB ({(peak - before) * 1024 / args.tenants:.1f} KiB per tenant); idling",
        flush=True,
    )
    after = peak
    deadline = loaded + args.idle_seconds * 1.25 + 30  # idle age + one sweep interval + settling
    while time.monotonic() < deadline:
        time.sleep(5)
        after = rss_mb()
        print(f"  idle {time.monotonic() - loaded:5.0f} s  RSS {after:7.1f} MiB", flush=True)
    print(
        f"RESULT tenants={args.tenants} code={args.code_kib}KiB before={before:.1f}MiB peak={peak:.1f}MiB "
        f"after_idle={after:.1f}MiB returned={(peak - after) / max(peak - before, 1e-9):.0%} of the growth",
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
