"""Tenant code that fails tells its author where and why: their traceback (not the SDK's frames) in
Get and Watch, programming errors failing at once, and no crash report for a workflow that raised."""

from __future__ import annotations

import json
import time

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import KernelProcess
from tests.helpers import publish

WORKFLOWS = """
from tenantflow.workflow import WorkflowEntrypoint


def lookup(data):
    return data["by"]


def failing_step():
    return lookup({})


class RunRaises(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("fine", lambda: 1)
        return lookup(event.payload)


class StepRaises(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("lookup", failing_step, retries={"limit": 0})


class DeepRaise(WorkflowEntrypoint):
    def run(self, event, step):
        def down(n):
            if n == 0:
                raise ValueError("x" * 10000)
            return down(n - 1)
        return down(300)


class NotCallable(WorkflowEntrypoint):
    async def run(self, event, step):
        async def fetch():
            return 1
        return await step.do("fetch", fetch())


class NotAwaited(WorkflowEntrypoint):
    async def run(self, event, step):
        step.do("forgotten", lambda: 1)
        return "done"


class Plain(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("ok", lambda: 1)
        raise KeyError("by")
"""


def _ended(client: Client, tenant: str, id: str) -> pb.Instance:
    return client.wait(tenant, id, timeout=60)


def test_run_that_raises_shows_the_tenants_own_frames(client: Client, tenant: str) -> None:
    code = publish(client, tenant, WORKFLOWS)
    client.create(tenant, "RunRaises", code, params={}, id="r")
    inst = _ended(client, tenant, "r")
    assert inst.status == pb.STATUS_ERRORED
    assert (inst.error.name, inst.error.message) == ("KeyError", "'by'")
    tb = inst.error.traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert 'File "wf.py", line 15, in run' in tb and 'File "wf.py", line 5, in lookup' in tb
    assert 'return data["by"]' in tb  # the tenant's source line, read from the published files
    assert "tenantflow" not in tb and "_runtime" not in tb  # no SDK frames
    assert tb.rstrip().endswith("KeyError: 'by'")
    status = [e for e in client.watch(tenant, "r") if e.kind == "status" and e.status == pb.STATUS_ERRORED]
    assert json.loads(status[-1].data_json)["traceback"] == tb


def test_a_failed_step_keeps_its_traceback_in_get_and_watch(client: Client, tenant: str) -> None:
    code = publish(client, tenant, WORKFLOWS)
    client.create(tenant, "StepRaises", code, id="s")
    inst = _ended(client, tenant, "s")
    (step,) = inst.steps
    assert step.status == "failed" and step.error.name == "KeyError"
    assert "in failing_step" in step.error.traceback and "in lookup" in step.error.traceback
    assert "_callbacks" not in step.error.traceback
    failed = next(e for e in client.watch(tenant, "s") if e.kind == "step_failed")
    assert json.loads(failed.data_json)["traceback"] == step.error.traceback


def test_a_traceback_is_bounded_to_4_kib_and_keeps_where_it_raised(client: Client, tenant: str) -> None:
    code = publish(client, tenant, WORKFLOWS)
    client.create(tenant, "DeepRaise", code, id="d")
    tb = _ended(client, tenant, "d").error.traceback
    assert len(tb.encode()) <= 4096
    assert "raise ValueError" in tb and "ValueError: xxx" in tb


def test_a_non_callable_step_fails_at_once_without_retries(client: Client, tenant: str) -> None:
    code = publish(client, tenant, WORKFLOWS)
    started = time.monotonic()
    client.create(tenant, "NotCallable", code, id="n")
    inst = _ended(client, tenant, "n")
    assert time.monotonic() - started < 30  # five back-offs from 10 s would take minutes
    assert inst.status == pb.STATUS_ERRORED and inst.error.name == "TypeError"
    assert "step 'fetch': step.do needs a function to call, got coroutine" in inst.error.message
    assert not inst.steps  # no attempt was made
    assert not any(e.kind == "log" for e in client.watch(tenant, "n"))  # no "never awaited" warning


def test_a_step_never_awaited_fails_the_instance_naming_it(client: Client, tenant: str) -> None:
    code = publish(client, tenant, WORKFLOWS)
    client.create(tenant, "NotAwaited", code, id="a")
    inst = _ended(client, tenant, "a")
    assert inst.status == pb.STATUS_ERRORED and inst.error.name == "StepNotAwaited"
    assert "step 'forgotten' was called but never awaited" in inst.error.message


def test_a_workflow_that_raised_is_no_sandbox_crash_in_the_kernel_log(
    kernel: KernelProcess, client: Client, tenant: str
) -> None:
    code = publish(client, tenant, WORKFLOWS)
    client.create(tenant, "Plain", code, id="p")
    assert _ended(client, tenant, "p").error.name == "KeyError"
    client.create(tenant, "RunRaises", code, params={}, id="q")
    _ended(client, tenant, "q")
    mine = [line for line in kernel.lines if tenant in line]
    assert not [line for line in mine if "stopped (crash)" in line or "exited with status" in line], mine
