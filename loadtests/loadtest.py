"""``make loadtest``: run a locust scenario headless against a kernel and write one report folder.

Starts ``tenantflow serve`` on a fresh data dir (metrics on), or targets ``--host``; samples the
kernel meanwhile; writes into ``--out``: locust's ``locust.html`` and ``locust_*.csv``, the
kernel's ``kernel_samples.csv`` and PNG plots (RSS, CPU, fds, processes, hibernating, storage).
Locust's progress shows while it runs; the closing lines print the tables. Exits non-zero on any
locust failure.

    .venv/bin/python loadtests/loadtest.py --scenario noisy --users 50 --duration 60s
    make loadtest ARGS='--scenario soak --duration 10m'
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402
from plots import write_plots  # noqa: E402
from sampler import KernelSampler, summary_rows, table, write_csv  # noqa: E402

HERE = Path(__file__).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenario", default="density", help="density | noisy | soak | all, or several joined by commas"
    )
    p.add_argument("--users", "-u", type=int, default=50, help="locust users (each one a tenant)")
    p.add_argument("--spawn-rate", "-r", type=float, default=10.0, help="users started per second")
    p.add_argument(
        "--duration", "-t", "--run-time", default="60s", help="run time, e.g. 20s, 5m, 1h (locust's -t)"
    )
    p.add_argument("--host", default="", help="HOST:PORT of a running kernel (default: start one)")
    p.add_argument("--kernel-pid", type=int, default=0, help="with --host: sample this process's /proc")
    p.add_argument("--metrics-url", default="", help="with --host: its http://.../metrics endpoint")
    p.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the kernel we start (repeatable), e.g. --kernel-arg=--max-concurrent=32")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default build/loadtest/<time>-<scenario>)"
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between kernel samples")
    p.add_argument("--quiet", action="store_true", help="only locust's summary, no stats every 2 s")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="after --: passed to locust as they are")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (
        args.out
        or HERE.parent
        / "build"
        / "loadtest"
        / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.scenario.replace(',', '+')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    kernel = None
    if args.host:
        host, pid, metrics_url, storage = args.host, args.kernel_pid or None, args.metrics_url, None
    else:
        kernel = BenchKernel(*args.kernel_arg, metrics=True)
        host, pid, metrics_url, storage = kernel.address, kernel.pid, kernel.metrics_url, kernel.storage_bytes
        print(f"kernel on {host} (pid {pid}, data {kernel.data_dir}, metrics {metrics_url})", flush=True)
    sampler = KernelSampler(pid, storage, metrics_url, args.interval).start()
    extra = [a for a in args.locust_args if a != "--"]
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration, "--host", host,
           "--html", str(out / "locust.html"), "--csv", str(out / "locust"), "--csv-full-history",
           "--stop-timeout", "10", *(["--only-summary"] if args.quiet else []), *extra]  # fmt: skip
    env = {**os.environ, "TENANTFLOW_SCENARIO": args.scenario}
    print("$ " + " ".join(cmd), flush=True)
    try:
        code = subprocess.call(cmd, env=env)
    finally:
        time.sleep(args.interval)  # one sample after the last request
        samples = sampler.stop()
        if kernel is not None:
            kernel.stop()
            if code == 0:  # its data and log are of no use once the report is written
                shutil.rmtree(kernel.data_dir, ignore_errors=True)
            else:
                print(f"the kernel's data and log are left in {kernel.data_dir}", flush=True)
    write_csv(samples, out / "kernel_samples.csv")
    skip = {"rss.png", "cpu.png", "fds.png", "processes.png"} if pid is None else set()
    skip |= {"storage.png"} if storage is None else set()
    title = f"tenantflow kernel during locust scenario {args.scenario!r}"
    plots = write_plots(samples, out, title, frozenset(skip))
    print(f"\nkernel over {samples[-1].t if samples else 0:.0f} s ({len(samples)} samples):")
    print(table([tuple(r) for r in summary_rows(samples)], ("what", "first", "peak", "last")))
    print(f"\nreport folder: {out}")
    print(f"  locust.html, locust_stats.csv, locust_stats_history.csv, locust_failures.csv, kernel_samples.csv, "
          f"{', '.join(p.name for p in plots)}")  # fmt: skip
    print("locust failures: see locust_failures.csv" if code else "locust: no failures")
    return code


if __name__ == "__main__":
    sys.exit(main())
