"""``ctx.kv`` read-modify-writes in concurrent steps, on a real kernel: a step whose reads changed
before its writes could commit runs again with fresh reads, so no update is lost, and the retry
limit does not count those runs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tenantflow.client import Client
from tenantflow.kernel.stepkinds import MAX_KV_CONFLICTS
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.kernel.test_metrics import metrics_url, scrape, value

RUNTIMES = ["python", "python-wasm"]
INSTANCES = 20
CONFLICTS = "tenantflow_step_kv_conflicts_total"

COUNTER = f"""
import time
from tenantflow.workflow import WorkflowEntrypoint

INSTANCES = {INSTANCES}

def increment(ctx):
    n = ctx.kv.get("counter", 0)
    # Until every instance has arrived nobody increments, so all of them read 0 first: the race
    # is certain (a witness, not a guess at timing). Polling makes these attempts conflict too.
    while n == 0 and len(ctx.kv.list("arrived/", limit=INSTANCES).items) < INSTANCES:
        time.sleep(0.05)
    ctx.kv.put("counter", n + 1)
    return n

class Counter(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("arrive", lambda ctx: ctx.kv.put("arrived/" + event.instance_id, 1))
        return step.do("increment", increment, retries={{"limit": 3, "delay": 0}})
"""


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--metrics-listen", "127.0.0.1:0"])
    k.start()
    yield k
    k.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_concurrent_increments_lose_no_update(metered: KernelProcess, runtime: str) -> None:
    with metered.client() as client:
        _increments(client, f"counter-{runtime}", runtime, metrics_url(metered))


def _increments(client: Client, tenant: str, runtime: str, url: str) -> None:
    before = value(scrape(url), CONFLICTS)
    ref = publish(client, tenant, COUNTER, runtime=runtime)
    ids = [f"c{n}" for n in range(INSTANCES)]
    for id in ids:
        client.create(tenant, "Counter", ref, id=id)
    seen = []
    for id in ids:
        done = client.wait(tenant, id, timeout=120)
        assert done.error.message == "", done.error
        seen.append(Client.output(done))
    assert sorted(seen) == list(range(INSTANCES))  # each read a value no other step wrote over
    assert json.loads(client.kv_get(tenant, "counter").value_json) == INSTANCES
    timelines = [list(client.export_history(tenant, id).timeline) for id in ids]
    conflicts = [[e for e in t if e.kind == "kv_conflict"] for t in timelines]
    messages = [e.message for mine in conflicts for e in mine]
    assert all("runs again" in m for m in messages)
    assert any("key 'counter' was written" in m for m in messages)  # lost the race, ran again
    failed_by_conflicts = 0
    for timeline, mine in zip(timelines, conflicts, strict=True):
        # a re-run is no failed attempt: only the 10th conflict in a row fails one (and it retries);
        # other failures (a sandbox starved on a loaded machine) are the retry policy's, not checked
        for failed in (
            e for e in timeline if e.kind == "step_failed" and e.message.startswith("KVConflict: ")
        ):
            assert not json.loads(failed.data_json)["final"]
            assert len([e for e in mine if e.attempt == failed.attempt]) == MAX_KV_CONFLICTS - 1
            failed_by_conflicts += 1
    # each refused run counted once
    assert value(scrape(url), CONFLICTS) - before == len(messages) + failed_by_conflicts
