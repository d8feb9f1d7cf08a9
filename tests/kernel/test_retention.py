"""Retention: ended instances are deleted after ``--retention-days``; live ones never are."""

from __future__ import annotations

from pathlib import Path

import grpc

from tenantflow.client import TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

FLOWS = """
from tenantflow.workflow import WorkflowEntrypoint

class Quick(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: 1)

class Sleepy(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("one", lambda: 1)
        step.sleep("nap", "1 hour")
"""


def test_ended_instances_are_purged_and_live_ones_kept(tmp_path: Path) -> None:
    retention_days = 3.0 / 86400  # three seconds
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--retention-days", str(retention_days)])
    kernel.start()
    try:
        with kernel.client() as client:
            ref = publish(client, "keeper", FLOWS)
            quick = client.wait("keeper", client.create("keeper", "Quick", ref).id, timeout=30)
            assert quick.status == pb.STATUS_COMPLETE
            sleepy = client.create("keeper", "Sleepy", ref)
            client.wait("keeper", sleepy.id, frozenset({pb.STATUS_WAITING}), timeout=30)

            def purged() -> bool:
                try:
                    client.get("keeper", quick.id)
                except TenantflowRpcError as exc:
                    assert exc.code == grpc.StatusCode.NOT_FOUND
                    return True
                return False

            wait_for(purged, timeout=30)
            assert client.get("keeper", sleepy.id).status == pb.STATUS_WAITING  # asleep far longer, kept
            assert [i.id for i in client.list("keeper").instances] == [sleepy.id]
    finally:
        kernel.stop()
    assert any("retention: deleted 1 instances" in line for line in kernel.lines)
