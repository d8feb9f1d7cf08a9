"""``tenantflow serve --storage kv+lmdb:///dir``: the FoundationDB plugin's engine under a real kernel,
with the same flags as SQLite; workflows survive a SIGKILL and no completed step runs again."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.plugins.storage_fdb import open_url
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

FLOW = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Flow(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        total = 0
        for i in range(p["steps"]):
            def effect(i=i):
                with open(p["log"], "a") as f:  # the side effect, counted outside storage
                    f.write(f"s{i}\\n")
                time.sleep(0.02)
                return i
            total += await step.do(f"s{i}", effect)
            if i == 2:
                await step.sleep("nap", 0.2)
        got = await step.wait_for_event("go", type="go", timeout="5 minutes")
        return total + got["payload"]
"""
INSTANCES, STEPS = 8, 10


def effects(directory: Path) -> Counter[tuple[str, str]]:
    return Counter((log.stem, line) for log in directory.glob("*.log") for line in log.read_text().split())


def test_a_kernel_on_lmdb_runs_workflows_through_a_sigkill(tmp_path: Path) -> None:
    store, effects_dir, tenant = tmp_path / "kv", tmp_path / "effects", "lmdb"
    effects_dir.mkdir()
    effects_dir.chmod(0o777)  # tenant code runs as another uid than the test
    args = [*TEST_LIMITS, "--storage", f"kv+lmdb://{store}", "--sandbox-writable-dir", str(effects_dir)]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        assert f"(storage kv+lmdb://{store})" in "\n".join(kernel.lines)
        client = kernel.client()
        ref = publish(client, tenant, FLOW)
        ids = [f"f{n}" for n in range(INSTANCES)]
        for id in ids:
            client.create(
                tenant, "Flow", ref, id=id, params={"steps": STEPS, "log": str(effects_dir / f"{id}.log")}
            )
            client.send_event(tenant, id, "go", 100)  # before the wait: kept, not lost
        wait_for(
            lambda: sum(effects(effects_dir).values()) >= INSTANCES * STEPS // 3, timeout=60, interval=0.01
        )
        client.close()
        kernel.kill()
        dead = open_url(f"kv+lmdb://{store}")  # read the store of the dead kernel directly
        before = {(id, s.key.split("#")[0]) for id in ids for s in dead.get_steps(tenant, id)
                  if s.kind == "do" and s.status == "complete"}  # fmt: skip
        dead.close()
        counts_at_kill = effects(effects_dir)
        assert before, "nothing had completed before the kill"
        kernel.start()
        client = kernel.client()
        for id in ids:
            done = client.wait(tenant, id, timeout=120)
            assert done.status == pb.STATUS_COMPLETE, (id, done.error)
            assert Client.output(done) == sum(range(STEPS)) + 100
        final = effects(effects_dir)
        assert set(final) == {(id, f"s{i}") for id in ids for i in range(STEPS)}
        assert not {step for step in before if final[step] != counts_at_kill[step]}, (
            "a completed step ran again"
        )
        assert sum(n - 1 for n in final.values()) <= INSTANCES  # only attempts in flight at the kill
        listed = [i.id for i in client.iter_instances(tenant, page_size=3)]
        assert listed == ids
        client.close()
    finally:
        kernel.stop()


@pytest.mark.skipif(ctypes.util.find_library("fdb_c") is not None, reason="libfdb_c is installed here")
def test_serve_with_fdb_but_no_client_library_says_what_to_install(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(tmp_path / "kernel"), *TEST_LIMITS, "--storage", "fdb://"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "listening" not in done.stdout
    assert "libfdb_c" in done.stderr and "foundationdb-clients" in done.stderr


def test_two_kernels_share_one_lmdb_store(tmp_path: Path) -> None:
    store, effects_dir, tenant = tmp_path / "kv", tmp_path / "effects", "pair"
    effects_dir.mkdir()
    effects_dir.chmod(0o777)  # tenant code runs as another uid than the test
    kernels = [
        KernelProcess(tmp_path / f"n{n}", [*TEST_LIMITS, "--node-id", f"n{n}", "--storage", f"kv+lmdb://{store}",
                                           "--sandbox-writable-dir", str(effects_dir)])
        for n in (1, 2)
    ]  # fmt: skip
    for kernel in kernels:
        kernel.start()
    try:
        clients = [k.client() for k in kernels]
        ref = publish(clients[0], tenant, FLOW)
        ids = [f"p{n}" for n in range(INSTANCES)]
        for n, id in enumerate(ids):  # creates and events spread over both nodes
            params = {"steps": STEPS, "log": str(effects_dir / f"{id}.log")}
            clients[n % 2].create(tenant, "Flow", ref, id=id, params=params)
            clients[(n + 1) % 2].send_event(tenant, id, "go", n)
        for n, id in enumerate(ids):
            done = clients[n % 2].wait(tenant, id, timeout=120)
            assert done.status == pb.STATUS_COMPLETE, (id, done.error)
            assert Client.output(done) == sum(range(STEPS)) + n
        final = effects(effects_dir)
        assert set(final) == {(id, f"s{i}") for id in ids for i in range(STEPS)}
        assert all(count == 1 for count in final.values())  # no kill: every step ran exactly once
        for client in clients:
            client.close()
    finally:
        for kernel in kernels:
            kernel.stop()
