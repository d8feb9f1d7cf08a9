"""Tenants are isolated: an instance id means something only inside its tenant."""

from __future__ import annotations

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish

CODE = """
from tenantflow.workflow import WorkflowEntrypoint

class Secret(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.wait_for_event("go", type="go", timeout="1 hour")
        return event.payload
"""


def test_another_tenant_cannot_see_or_touch_instances_or_code(client: Client, tenant: str) -> None:
    other = tenant + "-other"
    ref = publish(client, tenant, CODE)
    inst = client.create(tenant, "Secret", ref, params={"card": "4111"}, id="shared-id")
    client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_WAITING}))

    attempts = [
        lambda: client.get(other, "shared-id"),
        lambda: client.pause(other, "shared-id"),
        lambda: client.resume(other, "shared-id"),
        lambda: client.terminate(other, "shared-id"),
        lambda: client.delete(other, "shared-id"),
        lambda: client.restart(other, "shared-id"),
        lambda: client.send_event(other, "shared-id", "go", {}),
        lambda: list(client.watch(other, "shared-id")),
        lambda: client.create(other, "Secret", ref),  # the other tenant's pinned code
        lambda: client.create(other, "Secret", f"artifact://{tenant}/wf"),
    ]
    for attempt in attempts:
        with pytest.raises(TenantflowRpcError) as err:
            attempt()
        assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value
        assert "4111" not in err.value.message
    assert list(client.iter_instances(other)) == []

    # The same id is free in the other tenant, and each lives its own life.
    other_ref = publish(client, other, CODE)
    mine = client.create(other, "Secret", other_ref, params={"card": "mine"}, id="shared-id")
    assert mine.tenant == other
    client.send_event(other, "shared-id", "go", {})
    assert Client.output(client.wait(other, "shared-id")) == {"card": "mine"}
    assert client.get(tenant, "shared-id").status == pb.STATUS_WAITING
    client.send_event(tenant, "shared-id", "go", {})
    assert Client.output(client.wait(tenant, "shared-id")) == {"card": "4111"}


GARBLED = """
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError

class Garbled(WorkflowEntrypoint):
    def run(self, event, step):
        print("a lone surrogate: \\ud800")
        def fail():
            raise NonRetryableError("bad \\udfff text")
        try:
            step.do("fails", fail)
        except Exception:
            pass
        return step.do("value", lambda: "\\ud800")  # JSON carries it as an escape

class BadName(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("\\ud800", lambda: 1)
"""


def test_text_sqlite_cannot_store_harms_only_its_own_instance(client: Client, tenant: str) -> None:
    other = tenant + "-other"
    ref, other_ref = publish(client, tenant, GARBLED), publish(client, other, CODE)
    bystanders = [client.create(other, "Secret", other_ref) for _ in range(5)]
    garbled = client.create(tenant, "Garbled", ref)
    bad_name = client.create(tenant, "BadName", ref)
    done = client.wait(tenant, garbled.id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == "\ud800", done
    assert "\\udfff" in next(s for s in done.steps if s.name == "fails").error.message
    lines = [e.message for e in client.watch(tenant, garbled.id) if e.kind == "log"]
    assert any("\\ud800" in line for line in lines), lines
    errored = client.wait(tenant, bad_name.id, timeout=30)
    assert errored.status == pb.STATUS_ERRORED and "not valid Unicode" in errored.error.message
    for inst in bystanders:
        assert client.wait(other, inst.id, frozenset({pb.STATUS_WAITING}), timeout=30)
