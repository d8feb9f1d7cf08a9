"""Saga rollbacks through a real kernel: step.do(..., rollback=undo) (issue 12)."""

from __future__ import annotations

import json

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, wait_for

SAGA = """
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError

def undo(rb):
    return {"output": rb.output, "error": [rb.error.name, rb.error.message], "step": rb.ctx.name,
            "count": rb.ctx.count, "attempt": rb.ctx.attempt}

def flaky_undo(rb):
    if rb.ctx.attempt < 2:
        raise RuntimeError("refund service down")
    return "refunded"

def broken_undo(rb):
    raise NonRetryableError("cannot release")

class Booking(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("reserve", lambda: "seat-1", rollback=undo)
        await step.do("reserve", lambda: "seat-2", rollback=undo)
        await step.do("no undo", lambda: 1)
        await step.do("charge", lambda: {"charge": 7}, rollback=undo)
        await step.do("email", lambda: 1 / 0, retries={"limit": 0})

class Flaky(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("hold", lambda: "h", rollback=flaky_undo,
                rollback_config={"retries": {"limit": 2, "delay": 1, "backoff": "constant"}})
        step.do("release", lambda: "r", rollback=broken_undo)
        step.do("ship", lambda: "s", rollback=undo)
        raise ValueError("out of stock")

class Held(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("reserve", lambda: "seat-9", rollback=undo)
        await step.wait_for_event("approval", type="approve", timeout="1 hour")
        await step.do("never", lambda: "x", rollback=undo)

class Parent(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.create("kid", "Held")
        await step.do("reserve", lambda: "parent-seat", rollback=undo)
        await step.wait_for_event("approval", type="approve", timeout="1 hour")
"""


def _undos(inst: pb.Instance) -> list[tuple[str, int, str]]:
    return [(s.name, s.occurrence, s.status) for s in inst.steps if s.kind == "rollback"]


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_undos_run_in_reverse_step_start_order_with_output_error_and_context(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, SAGA, runtime=runtime)
    done = client.wait(tenant, client.create(tenant, "Booking", ref).id, timeout=90)
    assert done.status == pb.STATUS_ERRORED
    assert done.error.name == "StepError" and "ZeroDivisionError" in done.error.message  # the forward failure
    assert done.rollback.status == "complete" and done.rollback.reason == "failed"
    assert _undos(done) == [("charge", 0, "complete"), ("reserve", 1, "complete"), ("reserve", 0, "complete")]
    outputs = [json.loads(s.output_json) for s in done.steps if s.kind == "rollback"]
    assert outputs[0] == {"output": {"charge": 7}, "error": ["StepError", done.error.message], "step": "charge",
                          "count": 1, "attempt": 1}  # fmt: skip
    assert [(o["output"], o["count"]) for o in outputs[1:]] == [("seat-2", 2), ("seat-1", 1)]
    kinds = [e.kind for e in client.watch(tenant, done.id, timeout=30)]
    assert kinds.index("rollback_started") < kinds.index("rollback_completed") < len(kinds) - 1
    assert kinds[-1] == "status"


def test_a_failed_undo_is_told_apart_and_the_others_still_run(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SAGA)
    done = client.wait(tenant, client.create(tenant, "Flaky", ref).id, timeout=60)
    assert done.status == pb.STATUS_ERRORED
    assert done.error.name == "ValueError" and done.error.message == "out of stock"
    assert done.rollback.status == "failed"
    assert done.rollback.error.name == "NonRetryableError" and "'release'" in done.rollback.error.message
    undos = {s.name: s for s in done.steps if s.kind == "rollback"}
    assert [s.name for s in done.steps if s.kind == "rollback"] == ["ship", "release", "hold"]
    assert undos["hold"].status == "complete" and undos["hold"].attempts == 2  # retried after a 1 s delay
    assert json.loads(undos["hold"].output_json) == "refunded"
    assert undos["release"].status == "failed" and undos["release"].attempts == 1
    kinds = [e.kind for e in client.watch(tenant, done.id, timeout=30)]
    assert "rollback_failed" in kinds and "rollback_completed" not in kinds


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_terminate_with_rollback_undoes_completed_steps_then_terminates(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, SAGA, runtime=runtime)
    inst = client.create(tenant, "Held", ref)
    wait_for(lambda: client.get(tenant, inst.id).status == pb.STATUS_WAITING, timeout=60)
    answer = client.terminate(tenant, inst.id, rollback=True)
    assert answer.status != pb.STATUS_TERMINATED and answer.rollback.status == "running"
    done = client.wait(tenant, inst.id, timeout=60)
    assert done.status == pb.STATUS_TERMINATED and not done.error.name
    assert done.rollback.status == "complete" and done.rollback.reason == "terminated"
    assert _undos(done) == [("reserve", 0, "complete")]  # "never" never ran: nothing to undo
    # the wait it was terminated in ends with it, as without rollback
    assert [s.status for s in done.steps if s.name == "approval"] == ["terminated"]
    out = json.loads(next(s.output_json for s in done.steps if s.kind == "rollback"))
    assert out["output"] == "seat-9" and out["error"][0] == "Terminated"


def test_terminate_with_rollback_rolls_back_the_children_too(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SAGA)
    parent = client.create(tenant, "Parent", ref)
    wait_for(lambda: client.get(tenant, parent.id).status == pb.STATUS_WAITING)
    kid = client.get(tenant, parent.id).child_ids[0]
    wait_for(lambda: client.get(tenant, kid).status == pb.STATUS_WAITING)
    client.terminate(tenant, parent.id, rollback=True)
    for id, seat in ((parent.id, "parent-seat"), (kid, "seat-9")):
        done = client.wait(tenant, id, timeout=60)
        assert done.status == pb.STATUS_TERMINATED and done.rollback.status == "complete", id
        assert json.loads(next(s.output_json for s in done.steps if s.kind == "rollback"))["output"] == seat


def test_terminate_without_rollback_runs_no_undo(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SAGA)
    inst = client.create(tenant, "Held", ref)
    wait_for(lambda: client.get(tenant, inst.id).status == pb.STATUS_WAITING)
    done = client.terminate(tenant, inst.id)
    assert done.status == pb.STATUS_TERMINATED and not done.HasField("rollback") and not _undos(done)
