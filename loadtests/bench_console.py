"""The console's first paint with a large tenant (issue 22): 10,000 instances in one tenant, created
through the API, then the instance list and an instance page opened in headless Chromium (the
system's, driven by playwright-core from tests/console/node_modules, as the browser test does).

Prints, per page over --runs fresh loads (median and worst): first paint and first contentful
paint (the browser's paint timings) and the time until the data shows (the list's rows, the
instance's steps); the goal is an instance page's first paint under 300 ms.

    .venv/bin/python loadtests/bench_console.py [--instances 10000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tenantflow.client import Client

sys.path.insert(0, str(Path(__file__).parent))
from _kernel import BenchKernel  # noqa: E402

CONSOLE_DIR = Path(__file__).parents[1] / "tests" / "console"
TENANT = "big"
WORKFLOW = textwrap.dedent(
    """
    from tenantflow.workflow import WorkflowEntrypoint

    class Order(WorkflowEntrypoint):
        async def run(self, event, step):
            total = await step.do("price", lambda: {"total": event.payload["n"] * 3})
            await step.do("reserve", lambda: "reserved")
            got = await step.wait_for_event("payment", type="paid", timeout="1 day")
            return await step.do("ship", lambda: {"total": total, "paid": got["payload"]})
    """
)
# Runs in Chromium: load each page --runs times in a fresh page with the session already open, and
# measure from navigation start.
SCRIPT = r"""
import { chromium } from "playwright-core";
const { URL_BASE, CHROMIUM, TENANT, ID, RUNS } = process.env;
const browser = await chromium.launch({ executablePath: CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"] });
const out = {};
async function measure(name, hash, selector) {
  out[name] = [];
  for (let i = 0; i < Number(RUNS); i++) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await context.addInitScript(([tenant]) => {
      sessionStorage.setItem("tenantflow.tenant", tenant);
      sessionStorage.setItem("tenantflow.token", "");
    }, [TENANT]);
    const page = await context.newPage();
    await page.goto(`${URL_BASE}/${hash}`);
    await page.waitForSelector(selector, { timeout: 60000 });
    const shown = await page.evaluate(() => performance.now());
    await page.waitForFunction(() => performance.getEntriesByType("paint").length >= 2);
    const paints = await page.evaluate(() => Object.fromEntries(performance.getEntriesByType("paint").map((p) => [p.name, p.startTime])));
    out[name].push({ fp: paints["first-paint"], fcp: paints["first-contentful-paint"], shown });
    await context.close();
  }
}
await measure("instances", "#/instances", "#instances tbody tr[data-id]");
await measure("instance", `#/instance/${ID}`, "#steps tr[data-step]");
await browser.close();
console.log(JSON.stringify(out));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    node, chromium = shutil.which("node"), shutil.which("chromium") or shutil.which("chromium-browser")
    if node is None or chromium is None or not (CONSOLE_DIR / "node_modules" / "playwright-core").is_dir():
        raise SystemExit("needs node, chromium and tests/console/node_modules (make node-deps)")
    port = free_port()
    kernel = BenchKernel(
        "--http-listen", f"127.0.0.1:{port}", "--ui", "--tenant-create-rate", "0", synchronous="NORMAL"
    )
    try:
        with Client(kernel.address) as client:
            client.wait_ready()
            ref = client.publish(TENANT, "orders", {"wf.py": WORKFLOW}).ref
            started = time.monotonic()
            for first in range(0, args.instances, 100):
                items = [{"workflow": "Order", "code": ref, "id": f"order-{n:05}", "params": {"n": n}}
                         for n in range(first, min(first + 100, args.instances))]  # fmt: skip
                client.create_batch(TENANT, items)
            created = time.monotonic() - started
            waiting = 0  # let every instance run to its wait: the kernel idle, as a console usually finds it
            while waiting < args.instances:
                waiting = client.list(TENANT, status=7, page_size=1, include_count=True).total_count
                time.sleep(1)
            settled = time.monotonic() - started
        print(f"{args.instances} instances created through the API in {created:.1f} s, all waiting after "
              f"{settled:.1f} s; storage {kernel.storage_bytes() / 1e6:.0f} MB")  # fmt: skip
        env = {"URL_BASE": f"http://127.0.0.1:{port}", "CHROMIUM": chromium, "TENANT": TENANT,
               "ID": f"order-{args.instances // 2:05}", "RUNS": str(args.runs), "PATH": "/usr/bin:/bin"}  # fmt: skip
        result = subprocess.run([node, "--input-type=module", "-e", SCRIPT], cwd=CONSOLE_DIR, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"the browser run failed:\n{result.stdout}\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"\n{'page':<24}{'first paint':>18}{'first contentful':>20}{'data shown':>18}   (ms: median / worst)"
        )
        for page, label in (("instances", "instance list"), ("instance", "instance page")):
            runs = figures[page]
            cells = [f"{statistics.median(r[k] for r in runs):.0f} / {max(r[k] for r in runs):.0f}"
                     for k in ("fp", "fcp", "shown")]  # fmt: skip
            print(f"{label:<24}{cells[0]:>18}{cells[1]:>20}{cells[2]:>18}")
        worst = max(r["fp"] for r in figures["instance"])
        print(f"\ninstance page first paint, worst of {args.runs}: {worst:.0f} ms (goal: under 300 ms)")
    finally:
        kernel.stop()


if __name__ == "__main__":
    main()
