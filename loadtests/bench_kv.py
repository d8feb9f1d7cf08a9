"""What ``ctx.kv`` costs a step (issue 24): sequential steps of one instance, on a real kernel.

    nice .venv/bin/python loadtests/bench_kv.py [--steps 500] [--runtime python python-wasm]
                                                [--sync NORMAL FULL]

Runs, per sandbox and ``synchronous`` mode, one instance of ``--steps`` sequential steps, each

- ``plain``: returns a number (the baseline);
- ``put``: writes one key (sent with the result, committed in the step's transaction);
- ``get+put``: reads a counter (a round trip to the kernel) and writes it back plus one;
- ``secret``: reads a secret (a round trip; the kernel decrypts it).

and prints steps/s and the time per step over the baseline. Step rates are measured on the kernel's
clock, from the first step started to the instance's end.

Measured (300 steps, this 2-core machine shared with other engineers, load average about 5; ms a
step over ``plain``, which ran at 0.7-1.3 ms): a write costs nothing measurable (-0.2..+0.3 ms: it
rides in the result message and the step's own commit); a read, a round trip to the kernel and a
storage read, +0.2..+0.5 ms (python +0.2-0.3, python-wasm +0.2-0.5); a secret read (decrypted with
AES-GCM) +0.1..+0.5 ms, about as much.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

from tenantflow.client import Client  # noqa: E402
from tenantflow.kernel.secretbox import new_key  # noqa: E402

FLOW = """
from tenantflow.workflow import WorkflowEntrypoint

def plain(ctx):
    return ctx.attempt

def put(ctx):
    ctx.kv.put("k/" + ctx.name, ctx.count)
    return 1

def get_put(ctx):
    n = ctx.kv.get("counter", 0) + 1
    ctx.kv.put("counter", n)
    return n

def secret(ctx):
    return len(ctx.secrets["TOKEN"])

KINDS = {"plain": plain, "put": put, "get+put": get_put, "secret": secret}

class Bench(WorkflowEntrypoint):
    def run(self, event, step):
        fn = KINDS[event.payload["kind"]]
        for n in range(event.payload["steps"]):
            step.do(f"s{n}", fn)
        return event.payload["steps"]
"""


def _when(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def steps_per_second(client: Client, tenant: str, ref: str, kind: str, steps: int) -> float:
    inst = client.create(tenant, "Bench", ref, params={"kind": kind, "steps": steps})
    done = client.wait(tenant, inst.id, timeout=600)
    assert done.error.message == "", done.error
    first = min(
        _when(e.at) for e in client.export_history(tenant, inst.id).timeline if e.kind == "step_started"
    )
    return steps / (_when(done.updated_at) - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--runtime", nargs="+", default=["python", "python-wasm"])
    parser.add_argument("--sync", nargs="+", default=["NORMAL", "FULL"])
    args = parser.parse_args()
    key = Path(tempfile.mkdtemp(prefix="tenantflow-bench-key-")) / "secrets.key"
    key.write_text(new_key() + "\n")
    print(f"{'sandbox':12} {'sync':7} {'step':8} {'steps/s':>8} {'ms/step':>8} {'+ms vs plain':>13}")
    for sync in args.sync:
        kernel = BenchKernel("--secrets-key", str(key), synchronous=sync)
        try:
            with Client(kernel.address) as client:
                for runtime in args.runtime:
                    tenant = f"bench-{runtime}-{sync.lower()}"
                    ref = client.publish(tenant, "bench", {"wf.py": FLOW}, runtime=runtime).ref
                    client.put_secret(tenant, "TOKEN", "t0ken-for-the-bench")
                    base = 0.0
                    for kind in ("plain", "put", "get+put", "secret"):
                        rate = steps_per_second(client, tenant, ref, kind, args.steps)
                        ms = 1000 / rate
                        base = base or ms
                        print(
                            f"{runtime:12} {sync:7} {kind:8} {rate:8.0f} {ms:8.2f} {ms - base:+13.2f}",
                            flush=True,
                        )
        finally:
            kernel.stop()


if __name__ == "__main__":
    main()
