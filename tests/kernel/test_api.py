"""Every RPC of tenantflow.v1 against a real kernel: happy paths and bad input with the right codes."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, source

HELLO = """
from tenantflow.workflow import WorkflowEntrypoint

class Hello(WorkflowEntrypoint):
    async def run(self, event, step):
        greeting = await step.do("greet", lambda: f"hello {event.payload['name']}")
        return {"greeting": greeting, "id": event.instance_id}
"""

SLEEPER = """
from tenantflow.workflow import WorkflowEntrypoint

class Sleeper(WorkflowEntrypoint):
    async def run(self, event, step):
        payload = event.payload
        await step.sleep("nap", payload.get("seconds", 60) if isinstance(payload, dict) else 60)
        return "rested"
"""


def code_of(error: pytest.ExceptionInfo[TenantflowRpcError]) -> grpc.StatusCode:
    return error.value.code


# -- Code.Publish ------------------------------------------------------------------------------------
def test_publish_is_content_addressed(client: Client, tenant: str) -> None:
    first = client.publish(tenant, "hello", {"wf.py": source(HELLO)})
    again = client.publish(tenant, "hello", {"wf.py": source(HELLO)})
    other = client.publish(tenant, "hello", {"wf.py": source(HELLO) + "\n# v2\n"})
    assert first.ref == again.ref
    assert first.ref.startswith(f"artifact://{tenant}/hello@sha256:") and len(first.ref.split(":")[-1]) == 64
    assert other.ref != first.ref
    assert list(first.workflows) == ["Hello"] and first.runtime == "python"


def test_publish_rejects_syntax_errors_with_file_and_line(client: Client, tenant: str) -> None:
    files = {"wf.py": source(HELLO), "helpers.py": "def ok():\n    return 1\n\ndef broken(:\n    pass\n"}
    with pytest.raises(TenantflowRpcError) as err:
        client.publish(tenant, "broken", files)
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "helpers.py, line 4" in err.value.message


@pytest.mark.parametrize(
    ("name", "runtime", "files", "needle"),
    [
        ("", "python", {"wf.py": HELLO}, "bad code name"),
        ("ok", "cobol", {"wf.py": HELLO}, "unknown runtime 'cobol'"),
        ("ok", "python", {}, "no files"),
        ("ok", "python", {"../escape.py": HELLO}, "bad file name"),
        ("ok", "python", {"wf.py": "x = 1\n"}, "defines no workflow class"),
    ],
)
def test_publish_bad_input(
    client: Client, tenant: str, name: str, runtime: str, files: dict[str, str], needle: str
) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.publish(tenant, name, {k: source(v) for k, v in files.items()}, runtime=runtime)
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.message


# -- Create / Get -------------------------------------------------------------------------------------
def test_create_runs_to_completion(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HELLO)
    created = client.create(tenant, "Hello", ref, params={"name": "ada"}, id="order-1")
    assert created.id == "order-1" and created.status == pb.STATUS_QUEUED and created.code == ref
    done = client.wait(tenant, "order-1")
    assert done.status == pb.STATUS_COMPLETE, done.error
    assert Client.output(done) == {"greeting": "hello ada", "id": "order-1"}
    assert [(s.name, s.status, s.attempts, json.loads(s.output_json)) for s in done.steps] == [
        ("greet", "complete", 1, "hello ada")
    ]
    assert done.created_at.endswith("Z") and done.updated_at >= done.created_at


def test_create_generates_ids_and_pins_latest(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HELLO, name="hello")
    created = client.create(tenant, "Hello", f"artifact://{tenant}/hello", params={"name": "x"})
    assert len(created.id) == 32 and created.code == ref


def test_create_existing_id_is_already_exists(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SLEEPER)
    client.create(tenant, "Sleeper", ref, id="dup")
    with pytest.raises(TenantflowRpcError) as err:
        client.create(tenant, "Sleeper", ref, id="dup")
    assert code_of(err) == grpc.StatusCode.ALREADY_EXISTS
    assert "'dup' already exists" in err.value.message


@pytest.mark.parametrize(
    ("workflow", "code", "params", "id", "expected", "needle"),
    [
        (
            "Nope",
            "{ref}",
            "",
            "",
            grpc.StatusCode.INVALID_ARGUMENT,
            "defines no workflow class 'Nope' (it defines: Hello)",
        ),
        ("Hello", "artifact://{tenant}/missing", "", "", grpc.StatusCode.NOT_FOUND, "never published"),
        (
            "Hello",
            "artifact://{tenant}/wf@sha256:" + "0" * 64,
            "",
            "",
            grpc.StatusCode.NOT_FOUND,
            "never published",
        ),
        ("Hello", "ftp://x", "", "", grpc.StatusCode.INVALID_ARGUMENT, "no code loader for 'ftp'"),
        ("Hello", "", "", "", grpc.StatusCode.INVALID_ARGUMENT, "code is required"),
        (
            "Hello",
            "{ref}",
            "{not json",
            "",
            grpc.StatusCode.INVALID_ARGUMENT,
            "params_json is not valid JSON",
        ),
        ("Hello", "{ref}", "", "bad id!", grpc.StatusCode.INVALID_ARGUMENT, "bad instance id"),
        ("Hello", "{ref}", "", "x" * 101, grpc.StatusCode.INVALID_ARGUMENT, "bad instance id"),
        ("", "{ref}", "", "", grpc.StatusCode.INVALID_ARGUMENT, "bad workflow"),
    ],
)
def test_create_bad_input(
    client: Client,
    tenant: str,
    workflow: str,
    code: str,
    params: str,
    id: str,
    expected: grpc.StatusCode,
    needle: str,
) -> None:
    ref = publish(client, tenant, HELLO)
    request = pb.CreateRequest(
        tenant=tenant, workflow=workflow, code=code.format(ref=ref, tenant=tenant), id=id, params_json=params
    )
    with pytest.raises(grpc.RpcError) as err:
        client.workflows.Create(request)
    assert err.value.code() == expected
    assert needle in (err.value.details() or "")


def test_oversize_payloads_are_resource_exhausted(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SLEEPER)
    big = {"blob": "x" * (1024 * 1024 + 10)}
    with pytest.raises(TenantflowRpcError) as err:
        client.create(tenant, "Sleeper", ref, params=big)
    assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 MiB" in err.value.message
    inst = client.create(tenant, "Sleeper", ref)
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, inst.id, "big", big)
    assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_get_unknown_is_not_found(client: Client, tenant: str) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.get(tenant, "ghost")
    assert code_of(err) == grpc.StatusCode.NOT_FOUND and "'ghost' not found" in err.value.message


def test_bad_tenant_is_invalid_argument(client: Client) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.get("", "x")
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "bad tenant" in err.value.message


# -- CreateBatch ------------------------------------------------------------------------------------------
def test_create_batch_is_all_or_nothing(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HELLO)
    made = client.create_batch(
        tenant, [{"workflow": "Hello", "code": ref, "params": {"name": str(i)}} for i in range(5)]
    )
    assert len(made) == 5 and len({m.id for m in made}) == 5
    for inst in made:
        assert client.wait(tenant, inst.id).status == pb.STATUS_COMPLETE
    with pytest.raises(TenantflowRpcError) as err:
        client.create_batch(
            tenant, [{"workflow": "Hello", "code": ref, "id": "b1"}, {"workflow": "Nope", "code": ref}]
        )
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TenantflowRpcError):
        client.get(tenant, "b1")  # nothing of the failed batch was created
    with pytest.raises(TenantflowRpcError) as err:
        client.create_batch(tenant, [])
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "at least one request" in err.value.message
    with pytest.raises(TenantflowRpcError) as err:
        client.create_batch(tenant, [{"workflow": "Hello", "code": ref}] * 101)
    assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 100" in err.value.message
    client.create(tenant, "Hello", ref, id="taken", params={"name": "x"})
    with pytest.raises(TenantflowRpcError) as err:
        client.create_batch(
            tenant,
            [
                {"workflow": "Hello", "code": ref, "id": "fresh"},
                {"workflow": "Hello", "code": ref, "id": "taken"},
            ],
        )
    assert code_of(err) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(TenantflowRpcError):
        client.get(tenant, "fresh")


# -- List ----------------------------------------------------------------------------------------------------
def test_list_pages_with_cursor_and_filters_by_status(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, SLEEPER)
    ids = [client.create(tenant, "Sleeper", ref, id=f"i{n:02d}").id for n in range(7)]
    for id in ids:
        client.wait(tenant, id, statuses=frozenset({pb.STATUS_WAITING}))
    client.terminate(tenant, "i03")
    page = client.list(tenant, page_size=3)
    assert [i.id for i in page.instances] == ids[:3] and page.next_page_token
    assert [i.id for i in client.iter_instances(tenant, page_size=2)] == ids
    waiting = [i.id for i in client.iter_instances(tenant, status=pb.STATUS_WAITING)]
    assert waiting == [i for i in ids if i != "i03"]
    assert [i.id for i in client.iter_instances(tenant, status=pb.STATUS_TERMINATED)] == ["i03"]
    for token in ("garbage", "9" * 30, "²"):  # not a number, too big for storage, a digit but not decimal
        with pytest.raises(TenantflowRpcError) as err:
            client.list(tenant, page_token=token)
        assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.message
    with pytest.raises(TenantflowRpcError) as err:
        client.list(tenant, page_size=5000)
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT


# -- SendEvent / Watch -------------------------------------------------------------------------------------
def test_send_event_and_watch(client: Client, tenant: str) -> None:
    ref = publish(
        client,
        tenant,
        """
        from tenantflow.workflow import WorkflowEntrypoint

        class Approve(WorkflowEntrypoint):
            async def run(self, event, step):
                print("waiting for approval")
                got = await step.wait_for_event("approval", type="approved", timeout="1 hour")
                return got["payload"]
        """,
    )
    inst = client.create(tenant, "Approve", ref)
    client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_WAITING}))
    seq = client.send_event(tenant, inst.id, "approved", {"by": "ops"})
    assert seq == 1
    kinds = [(e.kind, e.step) for e in client.watch(tenant, inst.id, timeout=30)]
    assert (
        ("waiting", "approval") in kinds
        and ("event", "") in kinds
        and ("step_completed", "approval") in kinds
    )
    assert ("log", "") in kinds and kinds[-1] == ("status", "")
    final = client.get(tenant, inst.id)
    assert final.status == pb.STATUS_COMPLETE and Client.output(final) == {"by": "ops"}
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, inst.id, "approved", {})
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, "ghost", "approved", {})
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, inst.id, "", {})
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TenantflowRpcError) as err:
        list(client.watch(tenant, "ghost"))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND


def test_watch_streams_status_changes_live(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, HELLO)
    inst = client.create(tenant, "Hello", ref, params={"name": "w"})
    events = list(client.watch(tenant, inst.id, timeout=30))
    statuses = [e.status for e in events if e.kind == "status"]
    assert statuses[0] == pb.STATUS_QUEUED and statuses[-1] == pb.STATUS_COMPLETE
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


# -- health, reflection ----------------------------------------------------------------------------------------
def test_health_and_reflection(kernel: object) -> None:
    address = kernel.address  # type: ignore[attr-defined]
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tenantflow.v1.Workflows", "tenantflow.v1.Code"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"tenantflow.v1.Workflows", "tenantflow.v1.Code", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.workflows.Get(pb.InstanceRef(tenant="bad tenant", id="x")),
        lambda c: c.workflows.Get(pb.InstanceRef(tenant="t", id="bad/id")),
        lambda c: c.workflows.Pause(pb.InstanceRef(tenant="t", id="")),
        lambda c: c.workflows.Resume(pb.InstanceRef(tenant="", id="x")),
        lambda c: c.workflows.Terminate(pb.InstanceRef(tenant="t", id="-x")),
        lambda c: c.workflows.Delete(pb.InstanceRef(tenant="t", id="")),
        lambda c: c.workflows.Restart(pb.RestartRequest(tenant="t", id="x y")),
        lambda c: c.workflows.SendEvent(pb.SendEventRequest(tenant="t", id="x", type="", payload_json="{}")),
        lambda c: c.workflows.SendEvent(
            pb.SendEventRequest(tenant="t", id="x", type="go", payload_json="{oops")
        ),
        lambda c: list(c.workflows.Watch(pb.InstanceRef(tenant="t", id="a b"))),
        lambda c: c.workflows.List(pb.ListRequest(tenant="t", status=99)),
        lambda c: c.workflows.List(pb.ListRequest(tenant="", status=0)),
        lambda c: c.workflows.CreateBatch(pb.CreateBatchRequest(requests=[])),
        lambda c: c.workflows.CreateBatch(
            pb.CreateBatchRequest(requests=[pb.CreateRequest(tenant="a"), pb.CreateRequest(tenant="b")])
        ),
        lambda c: c.code.Publish(pb.PublishRequest(tenant="t t", name="x", files={"wf.py": b"x=1"})),
        lambda c: c.code.Publish(pb.PublishRequest(tenant="t", name="x", files={"wf.py": b"\xff\xfe"})),
    ],
)
def test_every_rpc_rejects_malformed_requests(client: Client, call: object) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(client)  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()


# -- input at and over the boundaries ------------------------------------------------------------------
MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("params_json", "expected", "needle"),
    [
        ("[" * 64 + "]" * 64, grpc.StatusCode.OK, ""),
        ("[" * 65 + "]" * 65, grpc.StatusCode.INVALID_ARGUMENT, "nests arrays and objects 65 deep; the limit is 64"),
        ('["' + "[" * 100 + '\\"["]', grpc.StatusCode.OK, ""),  # brackets inside strings do not nest
        ('"' + "x" * (MIB - 2) + '"', grpc.StatusCode.OK, ""),
        ('"' + "x" * (MIB - 1) + '"', grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is 1048576 (1 MiB)"),
        ("1.7976931348623157e308", grpc.StatusCode.OK, ""),
        ("1e309", grpc.StatusCode.INVALID_ARGUMENT, "beyond a double's range"),
        ('{"x": -Infinity}', grpc.StatusCode.INVALID_ARGUMENT, "-Infinity is not a JSON number"),
        ('"\\ud83e\\udd80"', grpc.StatusCode.OK, ""),  # a surrogate pair is one character
        ('["\\udd80"]', grpc.StatusCode.INVALID_ARGUMENT, "lone UTF-16 surrogate"),
        ("9" * 5000, grpc.StatusCode.INVALID_ARGUMENT, "send it as a string"),
        ("{} {}", grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
    ],
)  # fmt: skip
def test_params_json_is_strict_rfc_8259_within_limits(
    client: Client, tenant: str, params_json: str, expected: grpc.StatusCode, needle: str
) -> None:
    ref = publish(client, tenant, SLEEPER)
    request = pb.CreateRequest(tenant=tenant, workflow="Sleeper", code=ref, params_json=params_json)
    if expected == grpc.StatusCode.OK:
        client.terminate(tenant, client.workflows.Create(request).id)
        return
    with pytest.raises(grpc.RpcError) as err:
        client.workflows.Create(request)
    assert err.value.code() == expected and needle in (err.value.details() or ""), err.value.details()


@pytest.mark.parametrize(
    ("page_size", "page_token", "ok"),
    [(1000, "", True), (1001, "", False), (-1, "", False), (0, "9" * 18, True), (0, "9" * 19, False),
     (0, "١٢", False), (0, "1\n", False)],
)  # fmt: skip
def test_list_page_bounds(client: Client, tenant: str, page_size: int, page_token: str, ok: bool) -> None:
    if ok:
        client.list(tenant, page_size=page_size, page_token=page_token)
        return
    with pytest.raises(TenantflowRpcError) as err:
        client.list(tenant, page_size=page_size, page_token=page_token)
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("files", "expected", "needle"),
    [
        ({"a" * 252 + ".py": HELLO}, grpc.StatusCode.OK, ""),  # 255 bytes: NAME_MAX
        ({"a" * 253 + ".py": HELLO}, grpc.StatusCode.INVALID_ARGUMENT, "longer than 255 bytes"),
        ({"pkg\\wf.py": HELLO}, grpc.StatusCode.INVALID_ARGUMENT, "use '/' to separate"),
        ({"wf.py": HELLO, "x\u2028.py": ""}, grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
        ({f"m{i}.py": "" for i in range(1001)}, grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is 1000"),
    ],
)
def test_publish_file_name_bounds(
    client: Client, tenant: str, files: dict[str, str], expected: grpc.StatusCode, needle: str
) -> None:
    request = pb.PublishRequest(
        tenant=tenant, name="wf", files={k: source(v).encode() for k, v in files.items()}
    )
    if expected == grpc.StatusCode.OK:
        client.code.Publish(request)
        return
    with pytest.raises(grpc.RpcError) as err:
        client.code.Publish(request)
    assert err.value.code() == expected and needle in (err.value.details() or ""), err.value.details()
