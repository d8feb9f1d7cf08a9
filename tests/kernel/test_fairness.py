"""One tenant's burst does not starve the others: claims go round-robin across tenants."""

from __future__ import annotations

from pathlib import Path

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

SLOW = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Slow(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("work", lambda: time.sleep(0.2) or "done")
"""


def test_a_burst_does_not_starve_a_quiet_tenant(tmp_path: Path) -> None:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--max-concurrent", "2"])
    kernel.start()
    try:
        with kernel.client() as client:
            noisy_ref, quiet_ref = publish(client, "noisy", SLOW), publish(client, "quiet", SLOW)
            burst = client.create_batch("noisy", [{"workflow": "Slow", "code": noisy_ref}] * 16)
            quiet = client.create("quiet", "Slow", quiet_ref)
            done = client.wait("quiet", quiet.id, timeout=30)
            assert done.status == pb.STATUS_COMPLETE
            burst_done = [client.wait("noisy", i.id, timeout=60) for i in burst]
            assert all(b.status == pb.STATUS_COMPLETE for b in burst_done)
            ahead = sum(b.updated_at < done.updated_at for b in burst_done)
            # two slots: the burst instances already running, a few finishing alongside, then the quiet one
            assert ahead <= 6, f"the quiet tenant waited behind {ahead} of the 16 in the burst (FIFO: all 16)"
            assert Client.output(done) == "done"
    finally:
        kernel.stop()
