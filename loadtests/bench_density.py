"""Tenant density: drive a kernel to N hibernated instances over T tenants, then wake some by timer.

Every tenant publishes its own code (never seen before); every instance really runs a step in its
sandbox and then hibernates (a 30-day sleep), through the public API only. Sampled throughout:
kernel RSS, CPU, fds, sandbox processes, storage bytes, hibernating count (Prometheus endpoint).
Then ``--wake`` more instances arm timers due at ``--wake-rate`` per second while the others keep
sleeping; each woken one records, inside its next step, when that step ran: timer due → step
running is reported as p50/p99. Prints progress, then one Markdown table; samples and PNG plots go
to ``--out``.

    .venv/bin/python loadtests/bench_density.py --instances 2000 --tenants 200 --wake 200   # ~1 min
    nice -n 19 .venv/bin/python loadtests/bench_density.py --instances 1000000 --tenants 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402
from plots import write_plots  # noqa: E402
from sampler import KernelSampler, cpu_seconds, table, tree_cpu_seconds, write_csv  # noqa: E402

from tenantflow.client import Client  # noqa: E402
from tenantflow.v1 import tenantflow_pb2 as pb  # noqa: E402

CODE = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Idle(WorkflowEntrypoint):
    async def run(self, event, step):
        order = await step.do("accept", lambda: {"n": event.payload["n"], "state": "accepted"})
        await step.sleep("next month", "30 days")
        return order

class Alarm(WorkflowEntrypoint):
    async def run(self, event, step):
        at = await step.do("arm", lambda: event.payload["at"])
        await step.sleep_until("alarm", at)
        return await step.do("ring", lambda: {"at": at, "ran": time.time()})
"""
HERE = Path(__file__).parent


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    gib = int(mem.split()[1]) / 2**20
    return f"{os.cpu_count()} cores, {gib:.0f} GiB RAM, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "kernel", "plugins", "clients"],
                               capture_output=True, text=True, cwd=HERE.parent).stdout  # fmt: skip
        return sha.strip() + (" (kernel/plugins with local changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kernel = BenchKernel(*args.kernel_arg, metrics=True)
        self.sampler = KernelSampler(self.kernel.pid, self.kernel.storage_bytes, self.kernel.metrics_url, 2.0)
        self.client = Client(self.kernel.address, timeout=300)
        self.tenants = [f"density{t:06d}" for t in range(args.tenants)]
        self.refs: dict[str, str] = {}
        self.figures: list[tuple[str, str]] = []

    def figure(self, what: str, value: str) -> None:
        self.figures.append((what, value))
        say(f"{what}: {value}")

    def hibernating(self) -> int:
        latest = self.sampler.latest()
        return latest.hibernating if latest else 0

    def publish(self) -> None:
        def one(tenant: str) -> None:
            files = {"density.py": CODE + f"\n# the code of {tenant}\n"}
            self.refs[tenant] = self.client.publish(tenant, "density", files, runtime=self.args.runtime).ref

        started = time.perf_counter()
        with ThreadPoolExecutor(self.args.workers) as pool:
            for i, _ in enumerate(pool.map(one, self.tenants), 1):
                if i % max(1, len(self.tenants) // 10) == 0:
                    say(f"published {i:,}/{len(self.tenants):,} tenants' code")
        took = time.perf_counter() - started
        self.figure("Publish (each tenant its own code)", f"{len(self.tenants) / took:,.0f}/s")

    def create(self, workflow: str, per_tenant: dict[str, list[dict[str, Any]]]) -> float:
        """Create the given params per tenant in batches of 100; returns creates per second."""
        jobs = [
            (
                tenant,
                [{"workflow": workflow, "code": self.refs[tenant], "params": p} for p in params[i : i + 100]],
            )
            for tenant, params in per_tenant.items()
            for i in range(0, len(params), 100)
        ]
        total = sum(len(batch) for _, batch in jobs)
        started, done = time.perf_counter(), 0
        base, sent, lock = self.hibernating(), [0], threading.Lock()

        def send(job: tuple[str, list[dict[str, Any]]]) -> int:
            # Keep at most --backlog instances created but not yet asleep: the rate measured is the
            # kernel's steady one, not how long it takes to drain a queue of everything at once.
            while self.args.backlog and sent[0] - (self.hibernating() - base) > self.args.backlog:
                time.sleep(0.1)
            with lock:
                sent[0] += len(job[1])
            return len(self.client.create_batch(*job))

        with ThreadPoolExecutor(self.args.workers) as pool:
            for n in pool.map(send, jobs):
                done += n
                if done % max(100, total // 10) < n:
                    say(f"created {done:,}/{total:,} {workflow}; hibernating {self.hibernating():,}")
        return total / (time.perf_counter() - started)

    def wait_hibernating(self, target: int, started: float, timeout: float) -> float:
        """Wait until ``target`` instances hibernate; returns when that was (monotonic)."""
        last = 0.0
        while self.hibernating() < target:
            if time.monotonic() - started > timeout:
                raise SystemExit(f"only {self.hibernating():,}/{target:,} hibernating after {timeout:.0f} s")
            if time.monotonic() - last >= 10:
                s = self.sampler.latest()
                if s:
                    say(f"hibernating {s.hibernating:,}/{target:,}  RSS {s.rss_mib:.0f} MiB  "
                        f"CPU {s.cpu_percent:.0f}%  runs {s.sandbox_runs}  storage {s.storage_bytes / 2**20:,.0f} MiB")  # fmt: skip
                last = time.monotonic()
            time.sleep(0.5)
        return time.monotonic()

    def run(self) -> None:
        args = self.args
        self.sampler.start()
        self.publish()
        time.sleep(2)
        base_rss, base_bytes = self.kernel.rss_mib(), self.kernel.storage_bytes()
        idle = args.instances
        per_tenant: dict[str, list[dict[str, Any]]] = {t: [] for t in self.tenants}
        for n in range(idle):
            per_tenant[self.tenants[n % len(self.tenants)]].append({"n": n})
        started = time.monotonic()
        cpu_before = cpu_seconds(self.kernel.pid), tree_cpu_seconds(self.kernel.pid)
        rate = self.create("Idle", per_tenant)
        self.figure(f"Create (batches of 100, at most {args.backlog:,} not yet asleep)", f"{rate:,.0f}/s")
        done = self.wait_hibernating(idle, started, args.timeout)
        hib_rate = idle / (done - started)
        own = (cpu_seconds(self.kernel.pid) - cpu_before[0]) / idle
        tree = (tree_cpu_seconds(self.kernel.pid) - cpu_before[1]) / idle
        self.figure(
            "wake-ups into hibernation (create → step run → asleep)",
            f"{hib_rate:,.0f}/s over {done - started:,.0f} s",
        )
        # What a wake-up costs whatever share of the machine we got: the rate all its cores could give.
        self.figure("CPU per wake-up into hibernation: kernel / kernel + sandboxes",
                    f"{own * 1000:.1f} / {tree * 1000:.1f} ms (all {os.cpu_count()} cores: ≤ {(os.cpu_count() or 1) / tree:,.0f}/s)")  # fmt: skip
        time.sleep(4)
        s = self.sampler.sample()
        warm = [x.rss_mib for x in self.sampler.samples if x.hibernating >= idle // 10]
        self.figure("kernel RSS: before / at 10% hibernating / all hibernating",
                    f"{base_rss:.0f} / {warm[0] if warm else s.rss_mib:.0f} / {s.rss_mib:.0f} MiB")  # fmt: skip
        grown = s.storage_bytes - base_bytes
        self.figure("storage per hibernated instance (SQLite file + WAL)", f"{grown / idle:,.0f} bytes")
        self.figure("sandbox runs alive while all hibernate", str(s.sandbox_runs))
        self.figure(
            "processes under the kernel (templates, spares, warm runners) while idle", str(s.processes)
        )
        self.figure(
            "code cache entries (bounded, vs tenants)", f"{s.code_cache_entries:,} (tenants {args.tenants:,})"
        )
        self.figure("kernel open fds while idle", str(s.fds))
        self.verify_sample(min(200, idle))
        if args.wake:
            self.wake(idle, hib_rate)
        self.figure("kernel RSS peak over the run", f"{max(x.rss_mib for x in self.sampler.samples):.0f} MiB")

    def verify_sample(self, count: int) -> None:
        """Hibernated instances really ran their step in the sandbox (read back through the API)."""
        bad = 0
        for _ in range(count):
            tenant = random.choice(self.tenants)
            inst = next(iter(self.client.iter_instances(tenant, page_size=10)))
            full = self.client.get(tenant, inst.id)
            accept = next((st for st in full.steps if st.name == "accept"), None)
            ok = full.status == pb.STATUS_WAITING and accept is not None and accept.status == "complete"
            ok = ok and json.loads(accept.output_json if accept else "{}").get("state") == "accepted"
            bad += not ok
        self.figure("sampled instances that ran 'accept' then hibernated", f"{count - bad}/{count}")
        if bad:
            raise SystemExit(f"{bad} sampled instances did not run their step and hibernate")

    def wake(self, idle: int, hib_rate: float) -> None:
        args = self.args
        count = args.wake
        # Arm every alarm (one step, then asleep) before the first one is due.
        first_due = time.time() + count / hib_rate * 2 + 20
        per_tenant: dict[str, list[dict[str, Any]]] = {}
        for i in range(count):
            per_tenant.setdefault(self.tenants[i % len(self.tenants)], []).append(
                {"at": first_due + i / args.wake_rate}
            )
        say(
            f"arming {count:,} alarms due from {first_due - time.time():.0f} s from now at {args.wake_rate:g}/s"
        )
        started = time.monotonic()
        self.create("Alarm", per_tenant)
        self.wait_hibernating(idle + count, started, args.timeout)
        if time.time() > first_due:
            say("warning: some alarms were due before every alarm hibernated; latencies include that backlog")
        last_due = first_due + (count - 1) / args.wake_rate
        say(f"waiting for the alarms ({last_due - time.time():.0f} s)")
        time.sleep(max(0.0, last_due - time.time()) + 5)
        lags: list[float] = []
        deadline = time.time() + 120
        while True:
            lags = []
            for tenant in per_tenant:
                for inst in self.client.iter_instances(tenant, status=pb.STATUS_COMPLETE, page_size=1000):
                    out = json.loads(inst.output_json)
                    lags.append(out["ran"] - out["at"])
            if len(lags) >= count or time.time() > deadline:
                break
            say(f"{len(lags):,}/{count:,} alarms rang; waiting")
            time.sleep(5)
        self.figure(f"alarms rang (of {count:,}) while {idle:,} others sleep", f"{len(lags):,}")
        if lags:
            ms = [x * 1000 for x in lags]
            self.figure(f"timer due → step running at {args.wake_rate:g} wake-ups/s",
                        f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.0f} ms")  # fmt: skip

    def close(self, out: Path) -> None:
        samples = self.sampler.stop()
        self.client.close()
        self.kernel.stop()
        out.mkdir(parents=True, exist_ok=True)
        write_csv(samples, out / "kernel_samples.csv")
        write_plots(
            samples,
            out,
            title=f"bench_density: {self.args.instances:,} instances, {self.args.tenants:,} tenants",
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=100_000, help="instances driven into hibernation")
    p.add_argument("--tenants", type=int, default=10_000, help="tenants, each with its own published code")
    p.add_argument("--wake", type=int, default=10_000, help="then: instances woken by due timers (0: skip)")
    p.add_argument("--wake-rate", type=float, default=100.0, help="timers due per second while waking")
    p.add_argument("--runtime", default="python", help="python | python-wasm")
    p.add_argument("--workers", type=int, default=4, help="client threads publishing and creating")
    p.add_argument("--backlog", type=int, default=5000,
                   help="at most this many created but not yet asleep (0: create as fast as the kernel takes them)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=3600.0, help="give up waiting for hibernation after this")
    p.add_argument("--kernel-arg", action="append", default=[], metavar="ARG", help="extra kernel argument")
    p.add_argument(
        "--out", type=Path, default=None, help="samples and plots (default build/bench_density/<time>)"
    )
    args = p.parse_args()
    out = args.out or HERE.parent / "build" / "bench_density" / time.strftime("%Y%m%d-%H%M%S")
    command = "python loadtests/bench_density.py " + " ".join(sys.argv[1:])
    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.close(out)
    rows = [
        ("machine", machine()),
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", commit()),
        ("command", f"`{command}`"),
        ("runtime, storage", f"{args.runtime}, SQLite (synchronous=FULL)"),
        ("instances, tenants", f"{args.instances:,} hibernated over {args.tenants:,} tenants"),
        *bench.figures,
        ("whole run", f"{time.monotonic() - started:,.0f} s"),
        ("samples and plots", str(out)),
    ]
    print(table(rows, ("bench_density", "")))


if __name__ == "__main__":
    main()
