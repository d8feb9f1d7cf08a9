"""Code.List shows a tenant's published versions newest first; the client speaks status names."""

from __future__ import annotations

import grpc
import pytest

from tenantflow.client import Client, Status, TenantflowRpcError
from tests.helpers import publish

FLOW = """
from tenantflow.workflow import WorkflowEntrypoint

class Flow(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.wait_for_event("go", type="go")
        return {VERSION}
"""


def test_code_list_pages_newest_first_and_filters_by_name(client: Client, tenant: str) -> None:
    refs = [publish(client, tenant, FLOW.replace("{VERSION}", str(n)), name="flow") for n in range(3)]
    other = publish(client, tenant, FLOW.replace("{VERSION}", "9"), name="other")
    first = client.list_code(tenant, page_size=2)
    rest = client.list_code(tenant, page_size=2, page_token=first.next_page_token)
    listed = [*first.versions, *rest.versions]
    assert [v.ref for v in listed] == [other, *reversed(refs)] and not rest.next_page_token
    assert {(v.runtime, tuple(v.workflows)) for v in listed} == {("python", ("Flow",))}
    assert [v.name for v in listed] == ["other", "flow", "flow", "flow"]
    assert all(v.published_at.endswith("Z") for v in listed)
    assert [v.ref for v in client.iter_code(tenant, "flow", page_size=1)] == list(reversed(refs))
    assert list(client.iter_code("nobody-" + tenant)) == []


def test_publish_answers_with_name_and_when(client: Client, tenant: str) -> None:
    version = client.publish(tenant, "flow", {"wf.py": FLOW.replace("{VERSION}", "1")})
    assert version.name == "flow" and version.published_at.endswith("Z")
    (listed,) = client.list_code(tenant).versions
    assert listed.published_at == version.published_at


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"page_token": "x"}, "page_token is not one"), ({"page_size": 5000}, "page_size must be 0..1000"),
     ({"name": "bad name"}, "bad code name")],
)  # fmt: skip
def test_code_list_refuses_bad_requests(client: Client, tenant: str, kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TenantflowRpcError) as err:
        client.list_code(tenant, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.message


def test_statuses_read_as_names_and_list_takes_one(client: Client, tenant: str) -> None:
    code = publish(client, tenant, FLOW.replace("{VERSION}", "1"))
    client.create(tenant, "Flow", code, id="w")
    inst = client.wait(tenant, "w", statuses=["waiting"])
    assert str(Status(inst.status)) == "waiting" and Status(inst.status) is Status.WAITING
    assert [i.id for i in client.list(tenant, status="waiting").instances] == ["w"]
    assert [i.id for i in client.list(tenant, status=Status.COMPLETE).instances] == []
    assert [i.id for i in client.iter_instances(tenant, status="WAITING")] == ["w"]
    with pytest.raises(ValueError, match="unknown status 'sleeping': one of queued, running, paused"):
        client.list(tenant, status="sleeping")
