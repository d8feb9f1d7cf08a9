"""Upgrade: live instances move to new code only when their journal replays cleanly on it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, source, wait_for

V1 = """
from tenantflow.workflow import WorkflowEntrypoint

VERSION = "v1"

class Nap(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("first", lambda: VERSION)
        step.sleep("nap", event.payload["nap"])
        return [first, step.do("second", lambda: VERSION)]

class Approval(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("first", lambda: VERSION)
        go = step.wait_for_event("go", type="go", timeout="1 hour")
        return [first, step.do("second", lambda: VERSION), go["payload"]]
"""
COMPATIBLE = source(V1).replace('VERSION = "v1"', 'VERSION = "v2"')  # what steps return changes: fine
INCOMPATIBLE = source(V1).replace('VERSION = "v1"', 'VERSION = "v3"').replace('"first"', '"prepare"')
WAITING = frozenset({pb.STATUS_WAITING})


def _asleep(client: Client, tenant: str, ref: str, workflow: str, **params: object) -> str:
    inst = client.create(tenant, workflow, ref, params=params)
    client.wait(tenant, inst.id, statuses=WAITING)
    return inst.id


@pytest.mark.parametrize("workflow", ["Nap", "Approval"])
def test_a_compatible_change_moves_a_hibernating_instance_and_it_completes_on_the_new_code(
    client: Client, tenant: str, workflow: str
) -> None:
    old = publish(client, tenant, V1)
    new = client.publish(tenant, "wf", {"wf.py": COMPATIBLE}).ref
    id = _asleep(client, tenant, old, workflow, nap=2)

    dry = client.upgrade(tenant, new, [id], dry_run=True)
    assert [(o.id, o.result) for o in dry] == [(id, "compatible")], dry
    assert client.get(tenant, id).code == old  # a dry run changes nothing

    (outcome,) = client.upgrade(tenant, new, [id])
    assert (outcome.result, outcome.from_code, outcome.to_code) == ("upgraded", old, new), outcome
    inst = client.get(tenant, id)
    assert inst.code == new
    assert [(p.from_code, p.to_code) for p in inst.pin_changes] == [(old, new)] and inst.pin_changes[0].at
    assert "pin" not in [s.kind for s in inst.steps]
    if workflow == "Approval":
        client.send_event(tenant, id, "go", "ok")
    done = client.wait(tenant, id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE, done.error
    # the recorded step keeps what v1 returned; the step after the upgrade ran on v2
    assert Client.output(done)[:2] == ["v1", "v2"]
    changed = [e for e in client.watch(tenant, id, timeout=10) if e.kind == "code_changed"]
    assert len(changed) == 1 and json.loads(changed[0].data_json) == {"from": old, "to": new}


@pytest.mark.parametrize("workflow", ["Nap", "Approval"])
def test_an_incompatible_change_leaves_the_instance_on_its_pin_naming_the_step(
    client: Client, tenant: str, workflow: str
) -> None:
    old = publish(client, tenant, V1)
    bad = client.publish(tenant, "wf", {"wf.py": INCOMPATIBLE}).ref
    id = _asleep(client, tenant, old, workflow, nap=2)
    (outcome,) = client.upgrade(tenant, bad, workflow=workflow)
    assert (outcome.id, outcome.result, outcome.step) == (id, "diverged", "first"), outcome
    assert "'prepare'" in outcome.reason
    assert client.get(tenant, id).code == old
    if workflow == "Approval":
        client.send_event(tenant, id, "go", "ok")
    done = client.wait(tenant, id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done)[:2] == ["v1", "v1"]


def test_upgrade_skips_ended_instances_and_names_unknown_ones(client: Client, tenant: str) -> None:
    old = publish(client, tenant, V1)
    new = client.publish(tenant, "wf", {"wf.py": COMPATIBLE}).ref
    ended = client.create(tenant, "Nap", old, params={"nap": 0})
    client.wait(tenant, ended.id)
    outcomes = client.upgrade(tenant, new, [ended.id, "ghost"])
    assert [(o.id, o.result) for o in outcomes] == [(ended.id, "skipped"), ("ghost", "skipped")]
    assert "ended" in outcomes[0].reason and "does not exist" in outcomes[1].reason
    with pytest.raises(TenantflowRpcError) as err:
        client.upgrade(tenant, new)  # neither ids nor a workflow
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_upgrade_racing_wake_ups_on_another_node_never_mixes_code(tmp_path: Path, tenant: str) -> None:
    """Node A runs the instances (events wake them) while node B upgrades them: each instance either
    moved before its wake-up started (its later step returns v2, and the outcome says upgraded) or
    was left on v1 (running, or ended, when the upgrade reached it); never a mix."""
    db = tmp_path / "shared.sqlite3"
    nodes = [
        KernelProcess(tmp_path / name, ["--storage", f"sqlite:///{db}", "--node-id", name, *TEST_LIMITS])
        for name in ("a", "b")
    ]
    for node in nodes:
        node.start()
    try:
        with nodes[0].client() as a, nodes[1].client() as b:
            old = publish(a, tenant, V1)
            new = a.publish(tenant, "wf", {"wf.py": COMPATIBLE}).ref
            ids = [a.create(tenant, "Approval", old).id for _ in range(12)]
            wait_for(lambda: all(a.get(tenant, id).status == pb.STATUS_WAITING for id in ids), timeout=60)

            # Events go out newest instance first while the upgrade takes them oldest first: the first
            # ones move before their event comes, the last ones have run (or are running) by then.
            def send() -> None:
                for n, id in enumerate(reversed(ids)):
                    a.send_event(tenant, id, "go", n)
                    time.sleep(0.03)

            sender = threading.Thread(target=send)
            sender.start()
            outcomes = {o.id: o for o in b.upgrade(tenant, new, ids)}
            sender.join()
            assert list(outcomes) == ids
            for id in ids:
                done = a.wait(tenant, id, timeout=60)
                assert done.status == pb.STATUS_COMPLETE, done.error
                upgraded = outcomes[id].result == "upgraded"
                assert Client.output(done)[1] == ("v2" if upgraded else "v1"), (
                    outcomes[id],
                    Client.output(done),
                )
                assert done.code == (new if upgraded else old)
            results = [o.result for o in outcomes.values()]
            assert set(results) == {"upgraded", "skipped"}, outcomes  # the race went both ways
    finally:
        for node in nodes:
            node.stop()
