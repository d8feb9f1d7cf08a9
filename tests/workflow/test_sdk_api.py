"""The tenant SDK's public surface: pinned names, step contexts, event objects, typing (issue 12)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tenantflow.workflow as sdk
from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, wait_for

EXPORTED = [
    "BlockingStep", "ErrorInfo", "EventTimeoutError", "InstanceError", "NonDeterminismError", "NonRetryableError",
    "RetryPolicy", "RollbackConfig", "RollbackContext", "Step", "StepContext", "StepError", "WorkflowEntrypoint",
    "WorkflowEvent", "WorkflowStep", "parse_duration",
]  # fmt: skip


def test_the_exported_names_are_pinned() -> None:
    assert sorted(sdk.__all__) == EXPORTED
    assert all(hasattr(sdk, name) for name in EXPORTED)


def test_step_methods_are_typed_for_editors() -> None:
    assert (Path(sdk.__file__).parent / "py.typed").is_file()
    for protocol in (sdk.WorkflowStep, sdk.BlockingStep, sdk.Step):
        for method in ("do", "sleep", "sleep_until", "wait_for_event", "create", "wait_for_instance"):
            assert getattr(protocol, method).__annotations__.get("return"), (protocol, method)


def test_a_tenant_module_type_checks_against_the_step_protocol(tmp_path: Path) -> None:
    tenant = tmp_path / "tenant_wf.py"
    tenant.write_text(
        "from tenantflow.workflow import WorkflowEntrypoint, WorkflowEvent, WorkflowStep, StepContext\n"
        "class Good(WorkflowEntrypoint):\n"
        "    async def run(self, event: WorkflowEvent, step: WorkflowStep) -> int:\n"
        "        ev = await step.wait_for_event('w', type='t')\n"
        "        kid: str = await step.create('c', 'Good')\n"
        "        await step.wait_for_instance('j', kid)\n"
        "        def cb(ctx: StepContext) -> int:\n"
        "            return ctx.count + ctx.attempt + len(ctx.name)\n"
        "        n: int = await step.do('x', cb)\n"
        "        return n + len(ev.type) + ev.timestamp.year\n"
        "async def bad(step: WorkflowStep) -> None:\n"
        "    await step.sleeep('typo', 1)\n"
    )
    # the SDK as an installed package would be laid out (the editable install hides it from mypy)
    root = tmp_path / "site" / "tenantflow"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "workflow").symlink_to(Path(sdk.__file__).parent)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent", str(tenant)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={"MYPYPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("error:") == 1 and '"WorkflowStep" has no attribute "sleeep"' in result.stdout


def test_workflow_event_is_both_an_object_and_a_mapping() -> None:
    now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    run_event = sdk.WorkflowEvent(payload={"a": 1}, instance_id="i1", timestamp=now)
    assert run_event.payload == {"a": 1} and run_event.instance_id == "i1" and run_event.timestamp == now
    received = sdk.WorkflowEvent(type="approval", payload=2, timestamp="2026-06-01T12:00:00Z")
    assert received.type == "approval" and received.timestamp == now
    assert received["payload"] == 2 and received.get("type") == "approval"
    assert json.loads(json.dumps(received)) == {
        "type": "approval",
        "payload": 2,
        "timestamp": "2026-06-01T12:00:00Z",
    }


CONTEXTS = """
from tenantflow.workflow import WorkflowEntrypoint

def seen(ctx):
    return [ctx.name, ctx.step, ctx.count, ctx.attempt]

class Contexts(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.do("look", seen)
        second = await step.do("look", seen)
        ev = await step.wait_for_event("approval", type="approve", timeout=60)
        return {"first": first, "second": second, "type": ev.type, "payload": ev.payload,
                "mapping": ev["payload"], "year": ev.timestamp.year, "event": ev}

class SyncContexts(WorkflowEntrypoint):
    def run(self, event, step):
        ev = step.wait_for_event("approval", type="approve", timeout=60)
        return [step.do("look", seen), ev.type, ev.payload["n"], ev.get("type")]
"""


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_step_context_and_received_events_in_both_sandboxes(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, CONTEXTS, runtime=runtime)
    async_inst = client.create(tenant, "Contexts", ref)
    sync_inst = client.create(tenant, "SyncContexts", ref)
    for inst in (async_inst, sync_inst):
        wait_for(lambda inst=inst: client.get(tenant, inst.id).status == pb.STATUS_WAITING, timeout=60)
        client.send_event(tenant, inst.id, "approve", {"n": 5})
    out = Client.output(client.wait(tenant, async_inst.id, timeout=60))
    assert out["first"] == ["look", "look", 1, 1] and out["second"] == ["look", "look", 2, 1]
    assert out["type"] == "approve" and out["payload"] == out["mapping"] == {"n": 5}
    assert out["year"] >= 2024 and set(out["event"]) == {"type", "payload", "timestamp"}
    assert Client.output(client.wait(tenant, sync_inst.id, timeout=60)) == [
        ["look", "look", 1, 1],
        "approve",
        5,
        "approve",
    ]
