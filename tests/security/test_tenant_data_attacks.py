"""Attacks on what tenant code keeps (issue 24): a guest that bypasses the SDK to send too many or
bad key-value writes, or to read another tenant's keys, or a secret outside a step; and secret
values that must never come back out (Get, Watch, ExportHistory, logs, errors). Each attack also
checks that another tenant's workflow completes on time meanwhile."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tenantflow.client import Client
from tenantflow.kernel.secretbox import new_key
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes

RUNTIMES = ["python", "python-wasm"]
VALUE = "hunter2-Zq81-pX0"

HOSTILE = """
from tenantflow.workflow import WorkflowEntrypoint
from tenantflow.workflow import _tools

def too_many(ctx):
    ctx.kv._a.writes.update({f"k{i}": "1" for i in range(1001)})  # past the SDK's own check
    return "sent"

def not_json(ctx):
    ctx.kv._a.writes["bad"] = "{not json"
    return "sent"

def control_key(ctx):
    ctx.kv._a.writes["a\\x00b"] = "1"
    return "sent"

def huge(ctx):
    ctx.kv._a.writes.update({f"h{i}": '"' + "x" * 60000 + '"' for i in range(40)})  # 2.4 MB in one result
    return "sent"

def other_tenant(ctx):
    forged = ctx.kv._a.ask({"op": "kv", "key": ctx.kv._a.key, "attempt": ctx.attempt, "get": "plan",
                            "tenant": event_tenant})
    page = ctx.kv._a.ask({"op": "kv", "key": ctx.kv._a.key, "attempt": ctx.attempt, "list": "", "after": None,
                          "limit": 100, "tenant": event_tenant})
    return [ctx.kv.get("plan"), forged.get("value_json"), page.get("entries")]

event_tenant = ""

class Attack(WorkflowEntrypoint):
    def run(self, event, step):
        global event_tenant
        event_tenant = event.payload.get("victim", "")
        attack = globals()[event.payload["attack"]]
        if event.payload["attack"] == "outside":
            return _tools._tools.ask({"op": "secret", "key": "done#0", "attempt": 1, "name": "API_TOKEN"})
        return step.do("attack", attack, retries={"limit": 0})

def outside(ctx):
    return "unused"
"""

SECRETIVE = """
from tenantflow.workflow import WorkflowEntrypoint

def use(ctx):
    token = ctx.secrets["API_TOKEN"]
    print("token is", token)
    ctx.kv.put("note", "stored by a step")
    return {"token": token}

def fail(ctx):
    raise ValueError(f"bad token {ctx.secrets['API_TOKEN']}!")

class Secretive(WorkflowEntrypoint):
    def run(self, event, step):
        out = step.do("use", use)
        step.do("done", lambda: 1)
        step.do("fail", fail, retries={"limit": 0})
        return out
"""


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    home = tmp_path_factory.mktemp("keyed")
    (home / "secrets.key").write_text(new_key() + "\n")
    k = KernelProcess(home / "data", [*TEST_LIMITS, "--secrets-key", str(home / "secrets.key")])
    k.start()
    yield k
    k.stop()


def attack(client: Client, tenant: str, runtime: str, name: str, **payload: str) -> pb.Instance:
    ref = publish(client, tenant, HOSTILE, runtime=runtime)
    inst = client.create(tenant, "Attack", ref, params={"attack": name, **payload})
    return client.wait(tenant, inst.id, timeout=60)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    ("name", "says"),
    [
        (
            "too_many",
            "wrote 1001 keys; a step attempt may write at most 1000 (the kernel's --kv-max-writes-per-step)",
        ),
        ("not_json", "ctx.kv: the value is not JSON"),
        ("control_key", "ctx.kv: a key must not contain control characters"),
        ("huge", "messages are limited to"),
    ],
)
def test_bad_writes_fail_the_step_and_write_nothing(
    keyed: KernelProcess, tenant: str, runtime: str, name: str, says: str
) -> None:
    with keyed.client() as client:
        done = attack(client, tenant, runtime, name)
        assert done.status == pb.STATUS_ERRORED
        (step,) = [s for s in done.steps if s.name == "attack"]
        assert step.status == "failed" and says in step.error.message, step.error
        assert client.kv_list(tenant).usage.keys == 0  # nothing of it landed
        bystander_completes(client, tenant, runtime)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_tenant_cannot_read_another_tenants_keys(keyed: KernelProcess, tenant: str, runtime: str) -> None:
    victim = f"{tenant[:40]}-victim"
    with keyed.client() as client:
        client.kv_put(victim, "plan", "launch at dawn")
        done = attack(client, tenant, runtime, "other_tenant", victim=victim)
        assert Client.output(done) == [None, None, []]  # the kernel reads the instance's own tenant only
        bystander_completes(client, tenant, runtime)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_secret_asked_for_outside_a_step_is_refused(
    keyed: KernelProcess, tenant: str, runtime: str
) -> None:
    with keyed.client() as client:
        client.put_secret(tenant, "API_TOKEN", VALUE)
        done = attack(client, tenant, runtime, "outside")
        assert done.status == pb.STATUS_ERRORED and done.error.name == "SandboxProtocolError"
        assert "outside a running step attempt" in done.error.message
        assert VALUE not in str(done) and VALUE not in str(client.export_history(tenant, done.id))
        bystander_completes(client, tenant, runtime)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_secret_values_never_come_back_out(keyed: KernelProcess, tenant: str, runtime: str) -> None:
    with keyed.client() as client:
        client.put_secret(tenant, "API_TOKEN", VALUE)
        ref = publish(client, tenant, SECRETIVE, runtime=runtime)
        inst = client.create(tenant, "Secretive", ref)
        done = client.wait(tenant, inst.id, timeout=60)
        assert done.status == pb.STATUS_ERRORED and "bad token ***!" in done.error.message
        watched = list(client.watch(tenant, inst.id))
        exported = client.export_history(tenant, inst.id)
        listed = client.list_secrets(tenant)
        for seen in (done, watched, exported, listed, client.get(tenant, inst.id)):
            assert VALUE not in str(seen)
        assert any("token is ***" in e.message for e in exported.timeline)
        assert json_note(client, tenant) == '"stored by a step"'
        bystander_completes(client, tenant, runtime)
    assert not [line for line in keyed.lines if VALUE in line]  # nor in the kernel's own log


def json_note(client: Client, tenant: str) -> str:
    return str(client.kv_get(tenant, "note").value_json)
