"""List narrows a tenant's instances by workflow and creation time, and counts them."""

from __future__ import annotations

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tests.conftest import KernelProcess
from tests.helpers import publish
from tests.kernel.test_cli import tf

TWO = """
from tenantflow.workflow import WorkflowEntrypoint

class A(WorkflowEntrypoint):
    def run(self, event, step):
        return 1

class B(WorkflowEntrypoint):
    def run(self, event, step):
        return 2
"""


def test_list_by_workflow_and_creation_time_with_a_count(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, TWO)
    a = [client.create(tenant, "A", ref).id for _ in range(3)]
    middle = client.create(tenant, "B", ref)
    b = [middle.id, *(client.create(tenant, "B", ref).id for _ in range(2))]
    assert [i.id for i in client.iter_instances(tenant, workflow="B")] == b
    page = client.list(tenant, workflow="A", include_count=True)
    assert [i.id for i in page.instances] == a and page.total_count == 3
    since = client.list(tenant, created_after=middle.created_at, include_count=True)
    assert [i.id for i in since.instances] == b and since.total_count == 3
    before = client.list(tenant, created_before=middle.created_at)
    assert [i.id for i in before.instances] == a
    assert client.list(tenant, include_count=True).total_count == 6
    assert client.list(tenant).total_count == 0  # not asked for: not counted


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("created_after", "yesterday", "not an RFC 3339 time"),
        ("created_before", "2026-12-07T09:30:00", "has no time zone"),
        ("workflow", "not a class!", "workflow"),
    ],
)
def test_a_bad_filter_is_invalid_argument(
    client: Client, tenant: str, field: str, value: str, said: str
) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.list(tenant, **{field: value})  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and said in err.value.message


def test_the_cli_lists_with_filters_and_a_count(kernel: KernelProcess, client: Client, tenant: str) -> None:
    ref = publish(client, tenant, TWO)
    ids = [client.create(tenant, workflow, ref).id for workflow in ("A", "B", "B")]
    shown = tf(kernel, "list", "--tenant", tenant, "--workflow", "B", "--count")
    assert ids[0] not in shown and ids[1] in shown and ids[2] in shown and "2 instance(s) match" in shown
    refused = tf(kernel, "list", "--tenant", tenant, "--created-after", "soon", ok=False)
    assert "not an RFC 3339 time" in refused and "Traceback" not in refused
