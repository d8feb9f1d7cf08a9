"""Every ``*_json`` field the kernel returns is RFC 8259 JSON: NaN and Infinity out of tenant code fail
with a clear error instead of being stored for clients that cannot parse them."""

from __future__ import annotations

import json

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish

CODE = """
from tenantflow.workflow import WorkflowEntrypoint, StepError

class StepNaN(WorkflowEntrypoint):
    def run(self, event, step):
        try:
            step.do("ratio", lambda: {"ratio": float("nan")})
        except StepError as exc:
            return {"caught": exc.error_name, "message": exc.error_message}

class ReturnsInfinity(WorkflowEntrypoint):
    def run(self, event, step):
        return {"max": float("inf")}
"""


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_nan_and_infinity_never_reach_clients(client: Client, tenant: str, runtime: str) -> None:
    ref = publish(client, tenant, CODE, runtime=runtime)

    done = client.wait(tenant, client.create(tenant, "StepNaN", ref).id)
    assert done.status == pb.STATUS_COMPLETE, done
    caught = json.loads(done.output_json)
    assert "not JSON" in caught["message"] and "nan" in caught["message"].lower(), caught
    for step in done.steps:
        json.loads(step.output_json or "null", parse_constant=_refuse)

    ended = client.wait(tenant, client.create(tenant, "ReturnsInfinity", ref).id)
    assert ended.status == pb.STATUS_ERRORED, ended
    assert "not JSON" in ended.error.message, ended.error
    assert ended.output_json == ""


def _refuse(constant: str) -> None:
    raise AssertionError(f"the kernel sent {constant}, which is not JSON")
