"""ExportHistory: an instance's journal, inbox and timeline, in the documented JSON form."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, wait_for

WORKFLOW = """
from tenantflow.workflow import WorkflowEntrypoint

class Approve(WorkflowEntrypoint):
    def run(self, event, step):
        plan = step.do("plan", lambda: {"items": event.payload["n"]})
        step.sleep("settle", 0)
        approval = step.wait_for_event("approval", type="approve", timeout="1 hour")
        return step.do("apply", lambda: [plan["items"], approval["payload"]["by"]])
"""


def test_an_export_holds_the_journal_the_inbox_and_the_timeline(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, WORKFLOW)
    inst = client.create(tenant, "Approve", ref, params={"n": 3})
    wait_for(lambda: client.get(tenant, inst.id).status == pb.STATUS_WAITING)
    client.send_event(tenant, inst.id, "unrelated", {"x": 1})
    client.send_event(tenant, inst.id, "approve", {"by": "ana"})
    assert Client.output(client.wait(tenant, inst.id)) == [3, "ana"]

    history = client.export_history(tenant, inst.id)
    assert history.format == "tenantflow.history.v1"
    assert history.instance.id == inst.id and history.instance.code == ref
    assert [(e.key, e.kind, e.status) for e in history.journal] == [
        ("plan#0", "do", "complete"),
        ("settle#0", "sleep", "complete"),
        ("approval#0", "wait", "complete"),
        ("apply#0", "do", "complete"),
    ]
    assert [e.seq for e in history.journal] == sorted(e.seq for e in history.journal)
    assert json.loads(history.journal[0].output_json) == {"items": 3}
    assert history.journal[2].event_type == "approve"
    events = {e.type: e for e in history.events}
    assert events["approve"].consumed_by == "approval#0" and json.loads(events["approve"].payload_json) == {
        "by": "ana"
    }
    assert events["unrelated"].consumed_by == ""  # kept: sent, never waited for
    kinds = [e.kind for e in history.timeline]
    assert kinds[0] == "status" and "step_completed" in kinds and kinds[-1] == "status"

    # The JSON form round-trips: what `history export` writes is what `dev replay` reads.
    text = json_format.MessageToJson(history)
    assert json_format.Parse(text, pb.History()) == history


def test_exporting_an_unknown_instance_is_not_found(client: Client, tenant: str) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.export_history(tenant, "ghost")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
