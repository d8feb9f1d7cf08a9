"""``ctx.kv`` in a step, on a real kernel: writes commit with the step's result or not at all, reads
see committed data plus the attempt's own writes, and nothing outside a step callback reaches it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

RUNTIMES = ["python", "python-wasm"]

KV_FLOW = """
from tenantflow.workflow import WorkflowEntrypoint

def put_then_read(ctx):
    ctx.kv.put("a", {"n": 1})
    ctx.kv.put("gone", 1)
    ctx.kv.delete("gone")
    return [ctx.kv.get("a"), ctx.kv.get("gone", "absent"), ctx.kv.list("").items]

def flaky(ctx):
    ctx.kv.put("flaky", ctx.attempt)
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails: its write must not land")
    return ctx.kv.get("flaky")

class Flow(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("write", put_then_read)
        before = step.do("read committed", lambda ctx: [ctx.kv.get("a"), ctx.kv.get("flaky")])
        again = step.do("flaky", flaky, retries={"limit": 2, "delay": 0})
        page = step.do("list", lambda ctx: ctx.kv.list("", limit=1))  # (items, cursor), as JSON
        return {"first": first, "before": before, "again": again, "page": page}
"""

OUTSIDE = """
from tenantflow.workflow import WorkflowEntrypoint

class Outside(WorkflowEntrypoint):
    def run(self, event, step):
        kept = step.do("keep ctx", lambda ctx: ctx)  # not JSON: fails for good
        return kept
"""

LATER = """
from tenantflow.workflow import WorkflowEntrypoint

saved = []

class Later(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("save", lambda ctx: saved.append(ctx) or 1)
        try:
            saved[0].kv.get("a")
        except RuntimeError as exc:
            return str(exc)
        return "read outside a step"
"""

QUOTA = """
from tenantflow.workflow import WorkflowEntrypoint, StepError

class Quota(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("two", lambda ctx: [ctx.kv.put("k1", 1), ctx.kv.put("k2", 2)] and 1)
        try:
            step.do("third", lambda ctx: ctx.kv.put("k3", 3) or 1)
        except StepError as exc:
            return [exc.error_name, exc.error_message]
        return "passed the quota"
"""


@pytest.fixture(scope="module")
def quota_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(
        tmp_path_factory.mktemp("kvkernel"),
        [*TEST_LIMITS, "--kv-max-keys", "2", "--kv-max-reads-per-step", "3"],
    )
    k.start()
    yield k
    k.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_writes_commit_with_the_step_and_failed_attempts_leave_nothing(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, KV_FLOW, runtime=runtime)
    client.create(tenant, "Flow", ref, id="one")
    done = client.wait(tenant, "one")
    assert done.error.message == ""
    out = Client.output(done)
    assert out["first"] == [{"n": 1}, "absent", [["a", {"n": 1}]]]
    assert out["before"] == [{"n": 1}, None]
    assert out["again"] == 2  # attempt 1's write never landed; attempt 2 reads its own
    assert out["page"] == [[["a", {"n": 1}]], "a"]
    # a replay re-applies nothing: a second instance sees the first's keys as they were committed
    client.create(tenant, "Flow", ref, id="two")
    assert client.wait(tenant, "two").error.message == ""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_context_kept_past_its_step_cannot_reach_the_store(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, LATER, runtime=runtime)
    client.create(tenant, "Later", ref, id="later")
    done = client.wait(tenant, "later")
    assert "only inside the running step callback" in Client.output(done)


def test_the_quota_fails_the_step_naming_the_flag(quota_kernel: KernelProcess, tmp_path: Path) -> None:
    with quota_kernel.client() as client:
        ref = publish(client, "quota", QUOTA)
        client.create("quota", "Quota", ref, id="q")
        name, message = Client.output(client.wait("quota", "q"))
    assert name == "KVQuotaExceeded" and "--kv-max-keys" in message and "2 keys" in message


READS = """
from tenantflow.workflow import WorkflowEntrypoint

def reads(ctx):
    try:
        for n in range(4):
            ctx.kv.get(f"r{n}")
    except RuntimeError as exc:
        return [n, str(exc)]
    return "read past the budget"

class Reads(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("reads", reads)
"""


def test_reads_past_the_budget_raise_naming_the_flag(quota_kernel: KernelProcess) -> None:
    with quota_kernel.client() as client:
        ref = publish(client, "reads", READS)
        client.create("reads", "Reads", ref, id="r")
        n, message = Client.output(client.wait("reads", "r"))
    assert n == 3 and "--kv-max-reads-per-step" in message
