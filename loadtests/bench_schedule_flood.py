"""Schedules flood: how late does another tenant's every-second schedule fire while one tenant has N
every-second schedules?

The flooding tenant's schedules start a workflow that waits for an event for an hour, with overlap
``skip``: each schedule fires once, then every later tick is handled and skipped, so the figure is
the fire loop's own work, not sandbox load. The other tenant's schedule starts a one-step workflow
every second; its lag is the instance's creation time minus the fire time in its id.

    .venv/bin/python loadtests/bench_schedule_flood.py --schedules 500 --seconds 20
    .venv/bin/python loadtests/bench_schedule_flood.py --schedules 500 -- --tenant-max-schedules 0 \\
        --tenant-schedule-fire-rate 0   # no caps: fairness alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

from tenantflow.client import Client  # noqa: E402

WAITS = """
from tenantflow.workflow import WorkflowEntrypoint

class Waits(WorkflowEntrypoint):
    def run(self, event, step):
        return step.wait_for_event("go", type="go", timeout="1 hour")
"""

ECHO = """
from tenantflow.workflow import WorkflowEntrypoint

class Echo(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("echo", lambda: 1)
"""


def fire_time(id: str) -> float:
    return dt.datetime.strptime(id.split("@")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()


def lags(client: Client, tenant: str) -> list[float]:
    """Seconds from each fire time (in the instance id) to the instance's creation."""
    found = []
    for i in client.iter_instances(tenant):
        created = dt.datetime.fromisoformat(i.created_at.replace("Z", "+00:00")).timestamp()
        found.append(created - fire_time(i.id))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--schedules", type=int, default=500, help="every-second schedules of the flooding tenant"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to watch the other tenant")
    parser.add_argument("kernel_args", nargs="*", help="extra `tenantflow serve` flags (after --)")
    args = parser.parse_args()
    kernel = BenchKernel("--tenant-create-rate", "0", *args.kernel_args, synchronous="NORMAL")
    try:
        with Client(kernel.address) as c:
            flood = c.publish("flood", "waits", {"wf.py": WAITS}).ref
            made = refused = 0

            def create(n: int) -> bool:
                try:
                    c.create_schedule("flood", f"f{n}", "* * * * * *", "Waits", flood)
                    return True
                except Exception:
                    return False

            with ThreadPoolExecutor(8) as pool:
                for ok in pool.map(create, range(args.schedules)):
                    made, refused = made + ok, refused + (not ok)
            print(f"flooding tenant: {made} schedules made, {refused} refused", flush=True)
            time.sleep(3)  # the flood is under way
            other = c.publish("other", "echo", {"wf.py": ECHO}).ref
            c.create_schedule("other", "tick", "* * * * * *", "Echo", other, overlap="allow")
            time.sleep(args.seconds)
            c.pause_schedule("other", "tick")
            found = sorted(lags(c, "other"))
            s = c.get_schedule("other", "tick")
            ids = sorted(i.id for i in c.iter_instances("other"))
            gap = max((fire_time(b) - fire_time(a) for a, b in zip(ids, ids[1:], strict=False)), default=0.0)
            print(f"other tenant: {len(found)} fires in {args.seconds:g} s, skipped (counted) "
                  f"{s.skipped_fires}, longest gap between fires {gap:g} s")  # fmt: skip
            if found:
                p99 = found[min(len(found) - 1, int(len(found) * 0.99))]
                print(f"lag p50 {statistics.median(found):.2f} s, p99 {p99:.2f} s, max {found[-1]:.2f} s")
    finally:
        kernel.stop()


if __name__ == "__main__":
    main()
