"""A step's key-value writes across SIGKILLs, on each storage engine the suite is given: a real
``tenantflow serve`` over the engine runs counters that every step attempt increments (read, then
write one more), and is killed with SIGKILL several times while they run. Each counter must end at
exactly the number of steps that completed: a write applied without its step (a retry would add
one more), or a step recorded without its write (the next would add one less), shows."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tenantflow.client import Client
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.conformance.test_storage import storage_url

__all__ = ["storage_url"]  # the fixture this suite shares with the storage suite

INSTANCES, STEPS, KILLS = 4, 250, 3
COUNTER = """
from tenantflow.workflow import WorkflowEntrypoint

class Counter(WorkflowEntrypoint):
    def run(self, event, step):
        key = "counter/" + event.instance_id
        seen = []
        for n in range(event.payload["steps"]):
            def bump(ctx):
                value = ctx.kv.get(key, 0) + 1
                ctx.kv.put(key, value)
                return value
            seen.append(step.do(f"bump {n}", bump))
        return seen
"""


def _counted(client: Client, tenant: str) -> int:
    page = client.kv_list(tenant, "counter/", page_size=INSTANCES)
    return sum(json.loads(e.value_json) for e in page.entries)


def test_a_counter_bumped_by_every_step_survives_kernel_kills(storage_url: str, tmp_path: Path) -> None:
    tenant = "kills"
    kernel = KernelProcess(
        tmp_path / "kernel", [*TEST_LIMITS, "--storage", storage_url, "--lease-seconds", "2"]
    )
    kernel.start()
    try:
        with kernel.client() as client:
            ref = client.publish(tenant, "counter", {"wf.py": COUNTER}).ref
            for i in range(INSTANCES):
                client.create(tenant, "Counter", ref, id=f"c{i}", params={"steps": STEPS})
        total = INSTANCES * STEPS
        for kill in range(1, KILLS + 1):
            with kernel.client() as client:
                deadline = time.monotonic() + 60
                while _counted(client, tenant) < total * kill // (KILLS + 1):
                    assert time.monotonic() < deadline, "the counters stopped moving"
                    time.sleep(0.01)
            kernel.kill()  # mid-step: attempts are in flight
            kernel.start()
        with kernel.client() as client:
            for i in range(INSTANCES):
                done = client.wait(tenant, f"c{i}", timeout=60)
                assert Client.output(done) == list(range(1, STEPS + 1)), done.error
                assert json.loads(client.kv_get(tenant, f"counter/c{i}").value_json) == STEPS
            assert client.kv_list(tenant).usage.keys == INSTANCES
    finally:
        kernel.stop()
