"""SIGKILL the kernel in the middle of running workflows; restart it on the same file; every
instance completes, and no step that had completed before the kill runs again."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

CHAIN = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Chain(WorkflowEntrypoint):
    async def run(self, event, step):
        total = 0
        for i in range(event.payload["steps"]):
            def effect(i=i):
                # the side effect: one line per execution, outside the kernel's storage
                with open(event.payload["log"], "a") as f:
                    f.write(f"s{i}\\n")
                time.sleep(0.01)
                return i
            total += await step.do(f"s{i}", effect)
            if i % 4 == 3:
                await step.sleep(f"rest{i}", 0.05)
        return total
"""

INSTANCES, STEPS = 16, 12


def completed_steps(database: Path) -> set[tuple[str, str]]:
    """Steps whose completion was committed, read straight from the (dead) kernel's file."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT id, key FROM steps WHERE status = 'complete' AND kind = 'do'").fetchall()
    return {(id, key.split("#")[0]) for id, key in rows}


def effects(directory: Path) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for log in directory.glob("*.log"):
        for line in log.read_text().split():
            counts[(log.stem, line)] += 1
    return counts


def test_sigkill_loses_no_completed_step(tmp_path: Path) -> None:
    effects_dir = tmp_path / "effects"
    effects_dir.mkdir()
    effects_dir.chmod(0o777)  # tenant code runs as another uid than the test
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(effects_dir)])
    kernel.start()
    tenant = "durable"
    try:
        with kernel.client() as client:
            ref = publish(client, tenant, CHAIN)
            ids = [f"chain{n}" for n in range(INSTANCES)]
            for id in ids:
                client.create(
                    tenant,
                    "Chain",
                    ref,
                    id=id,
                    params={"steps": STEPS, "log": str(effects_dir / f"{id}.log")},
                )
            database = kernel.data_dir / "tenantflow.sqlite3"
            snapshots: list[tuple[set[tuple[str, str]], Counter[tuple[str, str]]]] = []
            for threshold in (0.2, 0.5):  # two kills at different depths of the runs
                wait_for(
                    lambda t=threshold: sum(effects(effects_dir).values()) >= t * INSTANCES * STEPS,
                    timeout=60,
                )
                kernel.kill()
                committed = completed_steps(database)
                assert committed, "nothing had completed before the kill"
                snapshots.append((committed, effects(effects_dir)))
                kernel.start()
                client = kernel.client()
            for id in ids:
                done = client.wait(tenant, id, timeout=120)
                assert done.status == pb.STATUS_COMPLETE, (id, done.error)
                assert Client.output(done) == sum(range(STEPS))
            final = effects(effects_dir)
            first_committed, first_counts = snapshots[0]
            assert all(first_counts[step] == 1 for step in first_committed)
            for committed, counts in snapshots:
                ran_again = {step for step in committed if final[step] != counts[step]}
                assert not ran_again, f"completed before a kill but ran again after it: {sorted(ran_again)}"
            assert set(final) == {(id, f"s{i}") for id in ids for i in range(STEPS)}
            rerun = sum(n - 1 for n in final.values())
            assert rerun <= 2 * INSTANCES  # only attempts in flight at a kill may run twice
            client.close()
    finally:
        kernel.stop()


def test_restart_after_clean_stop_continues_hibernating_instances(fresh_kernel: KernelProcess) -> None:
    tenant = "restartable"
    with fresh_kernel.client() as client:
        ref = publish(
            client,
            tenant,
            """
            from tenantflow.workflow import WorkflowEntrypoint

            class Later(WorkflowEntrypoint):
                async def run(self, event, step):
                    before = await step.do("before", lambda: "b")
                    await step.sleep("gap", 1.0)
                    got = await step.wait_for_event("ev", type="go", timeout="1 hour")
                    return [before, got["payload"]]
            """,
        )
        inst = client.create(tenant, "Later", ref)
        client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_WAITING}))
    fresh_kernel.stop()
    time.sleep(1.2)  # the sleep expires while no kernel runs
    fresh_kernel.start()
    with fresh_kernel.client() as client:
        wait_for(lambda: client.get(tenant, inst.id).steps[-1].name == "ev")
        client.send_event(tenant, inst.id, "go", 42)
        done = client.wait(tenant, inst.id)
        assert Client.output(done) == ["b", 42]
        assert done.steps[0].attempts == 1
