"""What restart and terminate do to an instance's inbox and steps: consumed events are spent by a
restart unless kept, and a terminated instance's waiting step ends with it."""

from __future__ import annotations

from tenantflow.client import Client, Status
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish

PIPELINE = """
from tenantflow.workflow import WorkflowEntrypoint

class Deploy(WorkflowEntrypoint):
    async def run(self, event, step):
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        return await step.do("deploy", lambda: approval["payload"])
"""


def test_restart_does_not_deploy_again_on_the_old_approval(client: Client, tenant: str) -> None:
    code = publish(client, tenant, PIPELINE)
    client.create(tenant, "Deploy", code, id="d")
    client.send_event(tenant, "d", "approve", "first")
    assert client.output(client.wait(tenant, "d")) == "first"
    client.restart(tenant, "d")
    waiting = client.wait(tenant, "d", statuses=["waiting"])
    assert [(s.name, s.status) for s in waiting.steps] == [("approval", "waiting")]
    events = {e.sequence: e.consumed_by for e in client.export_history(tenant, "d").events}
    assert events == {1: "approval#0 (before a restart)"}
    client.send_event(tenant, "d", "approve", "second")
    assert client.output(client.wait(tenant, "d")) == "second"


def test_restart_may_keep_the_consumed_events(client: Client, tenant: str) -> None:
    code = publish(client, tenant, PIPELINE)
    client.create(tenant, "Deploy", code, id="k")
    client.send_event(tenant, "k", "approve", "first")
    client.wait(tenant, "k")
    client.restart(tenant, "k", keep_consumed_events=True)
    assert client.output(client.wait(tenant, "k")) == "first"  # the old approval is taken again


def test_a_terminated_instance_ends_its_waiting_step(client: Client, tenant: str) -> None:
    code = publish(client, tenant, PIPELINE)
    client.create(tenant, "Deploy", code, id="t")
    client.wait(tenant, "t", statuses=[Status.WAITING])
    ended = client.terminate(tenant, "t")
    assert ended.status == pb.STATUS_TERMINATED
    assert [(s.name, s.status, s.wake_at) for s in ended.steps] == [("approval", "terminated", "")]


def test_refusals_of_an_ended_instance_say_what_to_do(client: Client, tenant: str) -> None:
    import grpc
    import pytest

    from tenantflow.client import TenantflowRpcError

    code = publish(client, tenant, PIPELINE)
    client.create(tenant, "Deploy", code, id="e")
    client.send_event(tenant, "e", "approve", "ok")
    client.wait(tenant, "e")
    expected = {
        client.resume: "is complete, nothing to resume: restart it to run it again",
        client.pause: "only live instances pause (restart it to run it again)",
        client.terminate: "nothing to terminate (delete it to remove it, or restart it to run it again)",
    }
    for action, needle in expected.items():
        with pytest.raises(TenantflowRpcError) as err:
            action(tenant, "e")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and needle in err.value.message
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, "e", "approve", "again")
    assert "restart it to run it again, then send the event" in err.value.message
    client.restart(tenant, "e")
    client.wait(tenant, "e", statuses=["waiting"])
    with pytest.raises(TenantflowRpcError) as err:
        client.resume(tenant, "e")
    assert "is waiting, not paused: it goes on by itself" in err.value.message
