"""Pause, resume, terminate and restart, and what each refuses."""

from __future__ import annotations

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, wait_for

WORKFLOWS = """
import asyncio
import time
from tenantflow.workflow import WorkflowEntrypoint

class Steps(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.do("first", lambda: "one")
        await step.sleep("nap", event.payload["nap"])
        second = await step.do("second", lambda: time.time())
        return [first, second]

class Busy(WorkflowEntrypoint):
    async def run(self, event, step):
        def slow():
            time.sleep(1.0)
            return "done"
        await step.do("slow", slow)
        await step.do("next", lambda: "never while paused")
        return "finished"


class Branches(WorkflowEntrypoint):
    async def run(self, event, step):
        async def chain():
            await step.do("p1", lambda: time.sleep(0.3) or 1)
            return await step.do("p2", lambda: 2)
        return await asyncio.gather(step.do("slow", lambda: time.sleep(2.0) or 3), chain())
"""

WAITING = frozenset({pb.STATUS_WAITING})


def witness(client: Client, tenant: str, ref: str, workflow: str, params: object = None) -> str:
    """Run a twin of the instance under test to completion, started after the action under test:
    once it completes, the moment at which the other would have moved on has certainly passed (an
    absence checked after a fixed sleep proves nothing on a slow machine)."""
    twin = client.create(tenant, workflow, ref, params=params)
    assert client.wait(tenant, twin.id, timeout=60).status == pb.STATUS_COMPLETE
    return twin.id


@pytest.fixture
def ref(client: Client, tenant: str) -> str:
    return publish(client, tenant, WORKFLOWS)


def test_pause_a_hibernating_instance_then_resume(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Steps", ref, params={"nap": 0.5})
    client.wait(tenant, inst.id, statuses=WAITING)
    paused = client.pause(tenant, inst.id)
    assert paused.status == pb.STATUS_PAUSED
    assert client.pause(tenant, inst.id).status == pb.STATUS_PAUSED  # idempotent
    witness(
        client, tenant, ref, "Steps", {"nap": 0.5}
    )  # the nap is over, but a paused instance does not wake
    assert client.get(tenant, inst.id).status == pb.STATUS_PAUSED
    client.resume(tenant, inst.id)
    done = client.wait(tenant, inst.id)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done)[0] == "one"


def test_pause_while_running_waits_for_the_step(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Busy", ref)
    wait_for(lambda: any(s.status == "running" for s in client.get(tenant, inst.id).steps))
    assert client.pause(tenant, inst.id).status == pb.STATUS_WAITING_FOR_PAUSE
    paused = client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_PAUSED}))
    assert [(s.name, s.status) for s in paused.steps] == [("slow", "complete")]  # "next" did not start
    client.resume(tenant, inst.id)
    assert Client.output(client.wait(tenant, inst.id)) == "finished"


def test_resume_before_the_pause_lands_lets_parked_branches_go_on(
    client: Client, tenant: str, ref: str
) -> None:
    inst = client.create(tenant, "Branches", ref)
    wait_for(lambda: {s.name for s in client.get(tenant, inst.id).steps} >= {"slow", "p1"})
    assert client.pause(tenant, inst.id).status == pb.STATUS_WAITING_FOR_PAUSE
    # p1 finishes and p2 is parked at its boundary while "slow" still runs; then the pause is called off
    wait_for(
        lambda: any(s.name == "p1" and s.status == "complete" for s in client.get(tenant, inst.id).steps)
    )
    client.resume(tenant, inst.id)
    done = client.wait(tenant, inst.id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == [3, 2]


def test_a_pause_right_after_create_is_never_overwritten(client: Client, tenant: str, ref: str) -> None:
    ids = []
    for _ in range(20):  # some pauses land between the claim and the start of the wake-up
        inst = client.create(tenant, "Busy", ref)
        assert client.pause(tenant, inst.id).status in (pb.STATUS_WAITING_FOR_PAUSE, pb.STATUS_PAUSED)
        ids.append(inst.id)
    for id in ids:
        assert client.get(tenant, id).status in (pb.STATUS_WAITING_FOR_PAUSE, pb.STATUS_PAUSED)
    for id in ids:
        paused = client.wait(tenant, id, statuses=frozenset({pb.STATUS_PAUSED}), timeout=30)
        assert "next" not in [s.name for s in paused.steps]


def test_resume_refuses_an_instance_that_is_not_paused(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Steps", ref, params={"nap": 60})
    client.wait(tenant, inst.id, statuses=WAITING)
    with pytest.raises(TenantflowRpcError) as err:
        client.resume(tenant, inst.id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not paused" in err.value.message


def test_terminate_stops_for_good(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Steps", ref, params={"nap": 0.3})
    client.wait(tenant, inst.id, statuses=WAITING)
    assert client.terminate(tenant, inst.id).status == pb.STATUS_TERMINATED
    witness(client, tenant, ref, "Steps", {"nap": 0.3})  # its nap would have ended by now
    after = client.get(tenant, inst.id)
    assert after.status == pb.STATUS_TERMINATED and [s.name for s in after.steps] == ["first", "nap"]
    for action in (client.terminate, client.pause):
        with pytest.raises(TenantflowRpcError) as err:
            action(tenant, inst.id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_terminate_kills_a_running_step(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Busy", ref)
    wait_for(lambda: any(s.status == "running" for s in client.get(tenant, inst.id).steps))
    client.terminate(tenant, inst.id)
    witness(client, tenant, ref, "Busy")  # its slow step would have finished by now
    after = client.get(tenant, inst.id)
    assert after.status == pb.STATUS_TERMINATED
    assert after.steps[0].status == "terminated"  # stopped mid-attempt, ended with it; nothing written after


def test_restart_from_the_start_and_from_a_step(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Steps", ref, params={"nap": 0.1})
    first = client.wait(tenant, inst.id)
    stamp = Client.output(first)[1]
    restarted = client.restart(tenant, inst.id, from_step="second")
    assert restarted.status == pb.STATUS_QUEUED and restarted.code == first.code
    again = client.wait(tenant, inst.id)
    assert again.status == pb.STATUS_COMPLETE and Client.output(again)[1] > stamp
    assert [s.name for s in again.steps] == ["first", "nap", "second"]
    client.restart(tenant, inst.id)
    fresh = client.wait(tenant, inst.id)
    assert fresh.status == pb.STATUS_COMPLETE and Client.output(fresh)[1] > Client.output(again)[1]
    with pytest.raises(TenantflowRpcError) as err:
        client.restart(tenant, inst.id, from_step="nope")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "no step named 'nope'" in err.value.message


def test_restart_an_errored_instance(client: Client, tenant: str) -> None:
    ref = publish(
        client,
        tenant,
        """
        from tenantflow.workflow import WorkflowEntrypoint

        class Once(WorkflowEntrypoint):
            def run(self, event, step):
                n = step.do("attempts", lambda ctx: ctx.attempt)
                raise RuntimeError(f"failed after step {n}")
        """,
    )
    inst = client.create(tenant, "Once", ref)
    assert client.wait(tenant, inst.id).status == pb.STATUS_ERRORED
    client.restart(tenant, inst.id)
    again = client.wait(tenant, inst.id)
    assert again.status == pb.STATUS_ERRORED and again.error.message == "failed after step 1"


def test_control_of_unknown_instances_is_not_found(client: Client, tenant: str) -> None:
    for action in (client.pause, client.resume, client.terminate, client.restart, client.delete):
        with pytest.raises(TenantflowRpcError) as err:
            action(tenant, "ghost")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_delete_removes_ended_and_live_instances(client: Client, tenant: str, ref: str) -> None:
    ended = client.create(tenant, "Steps", ref, params={"nap": 0})
    assert client.wait(tenant, ended.id).status == pb.STATUS_COMPLETE
    busy = client.create(tenant, "Busy", ref)
    wait_for(lambda: any(s.status == "running" for s in client.get(tenant, busy.id).steps))
    for inst in (ended, busy):
        client.delete(tenant, inst.id)
        with pytest.raises(TenantflowRpcError) as err:
            client.get(tenant, inst.id)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert list(client.iter_instances(tenant)) == []
    with pytest.raises(TenantflowRpcError) as err:
        client.delete(tenant, busy.id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    twin = witness(client, tenant, ref, "Busy")  # the deleted instance's step would have finished by now
    assert [i.id for i in client.iter_instances(tenant)] == [twin]  # nothing reappears
    again = client.create(tenant, "Steps", ref, params={"nap": 0}, id=ended.id)  # the id is free again
    assert client.wait(tenant, again.id).status == pb.STATUS_COMPLETE
