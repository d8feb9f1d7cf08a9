"""Concurrency limits through a real kernel: at most N running per (workflow, concurrency key), queued
in order, other keys and workflows unaffected, a sleeping instance frees its slot; validation."""

from __future__ import annotations

import json

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tests.helpers import publish

HOLD = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Hold(WorkflowEntrypoint):
    def run(self, event, step):
        started = step.do("start", lambda: time.time())
        ended = step.do("hold", lambda: time.sleep(event.payload["hold"]) or time.time())
        return [started, ended]

class Naps(WorkflowEntrypoint):
    def run(self, event, step):
        started = step.do("start", lambda: time.time())
        step.sleep("nap", event.payload["nap"])
        return [started, step.do("end", lambda: time.time())]
"""


def most_at_once(intervals: list[list[float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    return peak


def test_at_most_n_run_at_once_per_key_in_order(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HOLD)
    limited = [
        client.create(tenant, "Hold", ref, {"hold": 0.6}, id=f"a{n}", concurrency_key="cust-a", concurrency_limit=2)
        for n in range(5)
    ]  # fmt: skip
    assert (limited[0].concurrency_key, limited[0].concurrency_limit) == ("cust-a", 2)
    others = [client.create(tenant, "Hold", ref, {"hold": 0.6}, id=f"b{n}", concurrency_key="cust-b",
                            concurrency_limit=2) for n in range(2)]  # fmt: skip
    free = client.create(tenant, "Hold", ref, {"hold": 0.6}, id="free")
    runs = {
        i.id: json.loads(client.wait(tenant, i.id, timeout=60).output_json) for i in [*limited, *others, free]
    }
    a = [runs[f"a{n}"] for n in range(5)]
    assert most_at_once(a) == 2  # never more than the limit, and the limit is used
    # admitted in creation order, two at a time: the two of one admission start in either order
    starts = [r[0] for r in a]
    assert max(starts[0:2]) < min(starts[2:4]) and max(starts[2:4]) < starts[4], starts
    # another key and an unlimited instance were not queued behind cust-a
    assert max(runs["b0"][0], runs["b1"][0], runs["free"][0]) < a[4][0]
    assert client.get(tenant, "a3").concurrency_limit == 2


def test_a_sleeping_instance_frees_its_slot(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HOLD)
    napper = client.create(tenant, "Naps", ref, {"nap": 3}, concurrency_key="k", concurrency_limit=1)
    worker = client.create(tenant, "Hold", ref, {"hold": 0.2}, concurrency_key="k", concurrency_limit=1)
    # Naps and Hold are different workflow classes: each its own group
    assert json.loads(client.wait(tenant, worker.id, timeout=60).output_json)
    second = client.create(tenant, "Naps", ref, {"nap": 0.1}, concurrency_key="k", concurrency_limit=1)
    nap = json.loads(client.wait(tenant, napper.id, timeout=60).output_json)
    other = json.loads(client.wait(tenant, second.id, timeout=60).output_json)
    assert other[1] < nap[1]  # the second one ran and ended while the first slept


def test_bad_concurrency_settings_are_refused(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HOLD)
    for key, limit in (("k", 0), ("", -1), ("x" * 300, 1), ("bad\nkey", 1), ("", 100_001)):
        with pytest.raises(TenantflowRpcError) as info:
            client.create(tenant, "Hold", ref, {"hold": 0}, concurrency_key=key, concurrency_limit=limit)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, (key, limit)
        assert "concurrency" in str(info.value)
