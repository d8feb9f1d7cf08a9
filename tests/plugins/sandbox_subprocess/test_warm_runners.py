"""Warm runners: a returning tenant's wake-up reuses the run process of its previous one (same code
version), with nothing of the previous instance left, and only where every per-wake-up guarantee
still holds; never across tenants or versions."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for
from tests.security.bystander import bystander_completes

CODE = """
import builtins, gc, json, os, socket, threading, time
from tenantflow.workflow import WorkflowEntrypoint

SEEN = []  # module state: a new wake-up must start with it empty

class Who(WorkflowEntrypoint):
    async def run(self, event, step):
        SEEN.append(event.payload.get("mark"))
        def look():
            marks = [o for o in gc.get_objects() if isinstance(o, dict) and o.get("mark", "").startswith("secret-")
                     and o.get("mark") != event.payload.get("mark")]
            stash = getattr(builtins, "tf_stash", None)
            left = [getattr(json, "tf_stash", None), os.environ.get("TF_STASH"), json.load.__name__]
            if event.payload.get("stash"):
                builtins.tf_stash = event.payload["stash"]
                json.tf_stash = os.environ["TF_STASH"] = event.payload["stash"]
                json.load = len
            if event.payload.get("thread"):
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            if event.payload.get("spin_when_idle"):
                from tenantflow.plugins.sandbox_subprocess import wire
                said = wire.SocketTransport.notify
                def spin(self, message):  # says it is idle, then works on
                    said(self, message)
                    while message.get("op") == "idle":
                        pass
                wire.SocketTransport.notify = spin
            egress = {socket.getaddrinfo.__module__, socket.create_connection.__module__}
            return {"pid": os.getpid(), "seen": len(SEEN), "others": len(marks), "stash": stash, "left": left,
                    "egress": sorted(egress)}
        return await step.do("look", look)
"""


def _run(client: Client, tenant: str, ref: str, **payload: Any) -> dict[str, Any]:
    inst = client.create(tenant, "Who", ref, params={"mark": f"secret-{tenant}-{time.time_ns()}", **payload})
    done = client.wait(tenant, inst.id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE, done
    output = Client.output(done)
    assert isinstance(output, dict)
    return output


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_a_returning_tenant_reuses_its_runner_and_starts_fresh(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, CODE)
    runs = [_run(client, tenant, ref) for _ in range(4)]
    assert len({r["pid"] for r in runs}) == 1, f"each wake-up had a process of its own: {runs}"
    assert [r["seen"] for r in runs] == [1, 1, 1, 1], "module state outlived its wake-up"
    assert [r["others"] for r in runs] == [0, 0, 0, 0], "an earlier instance's event was still reachable"
    # Its connections still go through the kernel (the run's own set-up is part of what is restored).
    assert all(r["egress"] == ["tenantflow.plugins.sandbox_subprocess.egress_guest"] for r in runs), runs


def test_what_a_wake_up_binds_on_shared_modules_is_undone(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, CODE)
    first = _run(client, tenant, ref, stash="left-behind")
    second = _run(client, tenant, ref)
    assert second["pid"] == first["pid"]
    assert second["left"] == [None, None, "load"], (
        "a module attribute, os.environ or json.load outlived its wake-up"
    )


def test_runners_are_never_shared_across_tenants_or_code_versions(client: Client, tenant: str) -> None:
    other = f"{tenant[:40]}-other"
    ref, theirs = publish(client, tenant, CODE), publish(client, other, CODE)
    mine = _run(client, tenant, ref, stash="tenant-a-only")
    seen_by_other = [_run(client, other, theirs) for _ in range(2)]
    assert all(r["pid"] != mine["pid"] for r in seen_by_other)
    assert all(r["stash"] is None for r in seen_by_other), "another tenant saw what this one left behind"
    v2 = publish(client, tenant, CODE + "\n# v2\n")
    assert v2 != ref
    assert _run(client, tenant, v2)["pid"] != mine["pid"], (
        "a new code version ran in the old version's process"
    )


def test_a_run_that_leaves_a_thread_behind_is_not_reused(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, CODE)
    first = _run(client, tenant, ref, thread=True)
    wait_for(lambda: not _alive(first["pid"]), timeout=10)
    assert _run(client, tenant, ref)["pid"] != first["pid"]


def test_a_runner_that_works_while_parked_is_killed(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, CODE)
    spinning = _run(client, tenant, ref, spin_when_idle=True)
    wait_for(lambda: not _alive(spinning["pid"]), timeout=10)  # the sweep sees its CPU move
    assert _run(client, tenant, ref)["pid"] != spinning["pid"]
    bystander_completes(client, tenant)


def test_per_step_limits_hold_in_a_reused_runner(client: Client, tenant: str) -> None:
    loop = (
        CODE
        + """
class Loop(WorkflowEntrypoint):
    def run(self, event, step):
        def spin():
            while True:
                pass
        return step.do("spin", spin, retries={"limit": 0})
"""
    )
    ref = publish(client, tenant, loop)
    warm = _run(client, tenant, ref)["pid"]
    assert _run(client, tenant, ref)["pid"] == warm
    inst = client.create(tenant, "Loop", ref)
    done = client.wait(tenant, inst.id, timeout=30)
    assert done.status == pb.STATUS_ERRORED, done
    assert "CPU limit exceeded (3 s of CPU per step)" in done.steps[0].error.message
    assert not _alive(warm)
    bystander_completes(client, tenant)
    assert _run(client, tenant, ref)["seen"] == 1


@pytest.fixture
def short_lived(tmp_path: Path) -> Any:
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--warm-runner-idle-seconds", "1"])
    k.start()
    yield k
    k.stop()


def test_idle_runners_go_and_zero_turns_them_off(short_lived: KernelProcess, tmp_path: Path) -> None:
    with Client(short_lived.address) as client:
        ref = publish(client, "idle-tenant", CODE)
        pid = _run(client, "idle-tenant", ref)["pid"]
        assert _alive(pid)
        wait_for(lambda: not _alive(pid), timeout=10)  # an idle tenant costs no process
    off = KernelProcess(tmp_path / "off", [*TEST_LIMITS, "--warm-runners", "0"])
    off.start()
    try:
        with Client(off.address) as client:
            ref = publish(client, "cold-tenant", CODE)
            pids = [_run(client, "cold-tenant", ref)["pid"] for _ in range(3)]
            assert len(set(pids)) == 3, pids
            assert os.getpid() not in pids
    finally:
        off.stop()
