"""The other tenant in every attack test: a trivial workflow that must still complete on time."""

from __future__ import annotations

import time

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish

BYSTANDER = """
from tenantflow.workflow import WorkflowEntrypoint

class Bystander(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("echo", lambda: event.payload)
"""


def bystander_completes(client: Client, tenant: str, runtime: str = "python", within: float = 10.0) -> float:
    """Run another tenant's one-step workflow to completion; return how long it took.

    Fails unless it completes with the right output within ``within`` seconds: an attack in
    progress must not delay other tenants."""
    other = f"{tenant[:45]}-bystander"  # tenant names are at most 60 characters
    ref = publish(client, other, BYSTANDER, name="bystander", runtime=runtime)
    started = time.monotonic()
    inst = client.create(other, "Bystander", ref, params={"ok": 1})
    done = client.wait(other, inst.id, timeout=within)
    took = time.monotonic() - started
    assert done.status == pb.STATUS_COMPLETE, done
    assert Client.output(done) == {"ok": 1}
    assert took < within, f"the bystander took {took:.2f} s (limit {within} s)"
    return took
