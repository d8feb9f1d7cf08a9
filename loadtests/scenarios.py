"""Locust users over gRPC, one set per scenario; every user checks what it got back.

A call whose status or content is wrong is reported to locust as a failure (with what was
expected), so a run that "succeeds" with wrong answers shows up in the report.

- ``density``: :class:`DensityTenant` — each user is a never-seen tenant publishing its own code;
  its instances run a step, then hibernate (wait for an event, or sleep); some are woken later
  (event sent, or a short timer) and must complete with the right output.
- ``noisy``: :class:`NoisyTenant` (one user) floods creates while :class:`QuietTenant` users run
  one instance at a time; quiet latencies are reported under their own names ("quiet ...").
- ``soak``: :class:`SoakTenant` — a steady mix of create, get, list, send event and watch.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from locust import User, between, constant, events, task

from tenantflow.v1 import tenantflow_pb2 as pb
from tenantflow.v1 import tenantflow_pb2_grpc as pb_grpc

CODE = """
from tenantflow.workflow import WorkflowEntrypoint

class Order(WorkflowEntrypoint):
    async def run(self, event, step):
        total = await step.do("price", lambda: sum(event.payload["items"]))
        paid = await step.wait_for_event("payment", type="paid", timeout="1 hour")
        return await step.do("ship", lambda: {"total": total, "paid": paid["payload"]})

class Nap(WorkflowEntrypoint):
    async def run(self, event, step):
        n = await step.do("accept", lambda: event.payload["n"] * 2)
        await step.sleep("nap", event.payload["seconds"])
        return await step.do("wake", lambda: n + 1)

class Quick(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("work", lambda: sum(range(event.payload["n"])))
"""
WORKFLOWS = {"Order", "Nap", "Quick"}
LIVE = {pb.STATUS_QUEUED, pb.STATUS_RUNNING, pb.STATUS_WAITING}
TERMINAL = {pb.STATUS_COMPLETE, pb.STATUS_ERRORED, pb.STATUS_TERMINATED}
COMPLETE_WITHIN = 60.0  # seconds a woken instance may take to complete before it counts as a failure
_serial = itertools.count()


class WrongAnswer(Exception):
    """The call succeeded but its answer is not what the tenant expected."""


def status_name(status: int) -> str:
    return str(pb.Status.Name(status))


@dataclass
class Expected:
    id: str
    output: Any  # the output run() must return
    since: float  # when it was woken (event sent, or timer due); 0 while it should hibernate


class TenantUser(User):
    """One tenant over its own gRPC channel, publishing its own code (never seen by the kernel)."""

    abstract = True
    role = ""  # prefix of the request names, so a scenario can report one group of users apart

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.workflows = pb_grpc.WorkflowsStub(self.channel)
        self.code = pb_grpc.CodeStub(self.channel)
        self.tenant = f"{self.role or 'load'}-{next(_serial)}-{random.getrandbits(32):08x}"
        files = {"wf.py": (CODE + f"\n# tenant {self.tenant}\n").encode()}
        version = self.call("Publish", self.code.Publish, pb.PublishRequest(tenant=self.tenant, name="wf", files=files),
                            self._published)  # fmt: skip
        self.ref = version.ref if version is not None else ""

    def on_stop(self) -> None:
        self.channel.close()

    def name(self, rpc: str) -> str:
        return f"{self.role} {rpc}" if self.role else rpc

    def report(self, name: str, started: float, error: Exception | None, size: int = 0) -> None:
        events.request.fire(request_type="grpc", name=self.name(name), response_time=(time.perf_counter() - started) * 1000,
                            response_length=size, exception=error, context={"tenant": self.tenant})  # fmt: skip

    def call(
        self,
        name: str,
        method: Callable[..., Any],
        request: Any,
        check: Callable[[Any], str] | None = None,
        expected_codes: tuple[grpc.StatusCode, ...] = (),
    ) -> Any:
        """Run one RPC and report it; ``check`` returns what is wrong with the answer ("" if nothing).
        An error whose code is in ``expected_codes`` is reported as a success under ``name (CODE)``."""
        started = time.perf_counter()
        try:
            response = method(request, timeout=30)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in expected_codes:
                self.report(f"{name} ({code.name})", started, None)
                return None
            self.report(name, started, exc)
            return None
        wrong = check(response) if check is not None else ""
        self.report(name, started, WrongAnswer(wrong) if wrong else None, response.ByteSize())
        return None if wrong else response

    # -- checks -----------------------------------------------------------------------------------
    def _published(self, version: Any) -> str:
        if not version.ref.startswith(f"artifact://{self.tenant}/wf@sha256:"):
            return f"Publish returned ref {version.ref!r}, not a pinned artifact of this tenant"
        if not WORKFLOWS <= set(version.workflows):
            return f"Publish found workflows {list(version.workflows)}, expected {sorted(WORKFLOWS)}"
        return ""

    def _created(self, workflow: str) -> Callable[[Any], str]:
        def check(inst: Any) -> str:
            if inst.tenant != self.tenant or inst.workflow != workflow or not inst.id:
                return f"Create answered {inst.tenant}/{inst.id} {inst.workflow}, expected {self.tenant} {workflow}"
            if inst.code != self.ref:
                return f"Create pinned {inst.code!r}, expected {self.ref!r}"
            if inst.status not in LIVE:
                return f"a new instance is {status_name(inst.status)}"
            return ""

        return check

    def create(self, workflow: str, params: Any) -> str:
        request = pb.CreateRequest(
            tenant=self.tenant, workflow=workflow, code=self.ref, params_json=json.dumps(params)
        )
        inst = self.call("Create", self.workflows.Create, request, self._created(workflow))
        return str(inst.id) if inst is not None else ""

    def check_done(self, expected: Expected) -> bool | None:
        """Get ``expected``'s instance: True when complete with the right output, None while it may
        still be on its way, False (a failure reported) when wrong or late."""
        late = expected.since and time.time() - expected.since > COMPLETE_WITHIN

        def check(inst: Any) -> str:
            if inst.id != expected.id or inst.tenant != self.tenant:
                return f"Get answered {inst.tenant}/{inst.id}, expected {self.tenant}/{expected.id}"
            if inst.status == pb.STATUS_COMPLETE:
                output = json.loads(inst.output_json)
                return "" if output == expected.output else f"output {output!r}, expected {expected.output!r}"
            if inst.status in TERMINAL:
                return (
                    f"{expected.id} ended {status_name(inst.status)}: {inst.error.name}: {inst.error.message}"
                )
            if late:
                return (
                    f"{expected.id} still {status_name(inst.status)} {COMPLETE_WITHIN:g} s after it was woken"
                )
            return ""

        inst = self.call("Get", self.workflows.Get, pb.InstanceRef(tenant=self.tenant, id=expected.id), check)
        if inst is None:
            return False
        return True if inst.status == pb.STATUS_COMPLETE else None

    def check_hibernating(self, id: str, first_step: str, output: Any) -> None:
        """Get ``id``: it must have run ``first_step`` (with ``output``) and be hibernating or on its way."""

        def check(inst: Any) -> str:
            if inst.status not in LIVE:
                return f"{id} is {status_name(inst.status)}, expected it to hibernate"
            if inst.status != pb.STATUS_WAITING:
                return ""  # not there yet (queued behind others): fine
            step = next((s for s in inst.steps if s.name == first_step), None)
            if step is None or step.status != "complete" or json.loads(step.output_json) != output:
                return f"{id} hibernates but step {first_step!r} is {step and step.status!r}, expected complete = {output!r}"
            return ""

        self.call("Get", self.workflows.Get, pb.InstanceRef(tenant=self.tenant, id=id), check)

    def send_paid(self, id: str) -> bool:
        request = pb.SendEventRequest(tenant=self.tenant, id=id, type="paid", payload_json='{"card": "ok"}')
        answer = self.call("SendEvent", self.workflows.SendEvent, request,
                           lambda r: "" if r.sequence >= 1 else f"sequence {r.sequence}")  # fmt: skip
        return answer is not None


class DensityTenant(TenantUser):
    """A never-seen tenant: instances run a step and hibernate; some are woken later."""

    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        super().on_start()
        self.waiting: list[tuple[str, int]] = []  # (id, total) hibernating on wait_for_event
        self.napping: list[tuple[str, int, float]] = []  # (id, n, due) on a short timer
        self.woken: list[Expected] = []

    @task(4)
    def create_order(self) -> None:
        if not self.ref:
            return
        items = [random.randint(1, 9) for _ in range(3)]
        if id := self.create("Order", {"items": items}):
            self.waiting.append((id, sum(items)))

    @task(2)
    def create_nap(self) -> None:
        if not self.ref:
            return
        n, seconds = random.randint(1, 1000), random.uniform(2, 10)
        if id := self.create("Nap", {"n": n, "seconds": seconds}):
            self.napping.append((id, n, time.time() + seconds))

    @task(2)
    def check_one_hibernates(self) -> None:
        if self.waiting:
            id, total = random.choice(self.waiting)
            self.check_hibernating(id, "price", total)

    @task(2)
    def wake_one(self) -> None:
        """Pay an order that hibernates (a fifth of them stay asleep for good)."""
        if len(self.waiting) > 1 and random.random() < 0.8:
            id, total = self.waiting.pop(0)
            if self.send_paid(id):
                self.woken.append(Expected(id, {"total": total, "paid": {"card": "ok"}}, time.time()))
        now = time.time()
        for nap in [n for n in self.napping if n[2] <= now]:
            self.napping.remove(nap)
            self.woken.append(Expected(nap[0], nap[1] * 2 + 1, nap[2]))

    @task(2)
    def check_woken(self) -> None:
        if self.woken:
            expected = self.woken.pop(0)
            if self.check_done(expected) is None:
                self.woken.append(expected)


class QuietTenant(TenantUser):
    """A small tenant beside a noisy one: one instance at a time, timed from Create to its output."""

    role = "quiet"
    wait_time = between(0.5, 1.5)

    @task
    def run_one(self) -> None:
        if not self.ref:
            return
        n = random.randint(10, 1000)
        started = time.perf_counter()
        id = self.create("Quick", {"n": n})
        if not id:
            return
        expected = Expected(id, sum(range(n)), time.time())
        while (done := self.check_done(expected)) is None:
            time.sleep(0.1)
        if done:
            self.report("create→complete", started, None)


class NoisyTenant(TenantUser):
    """One tenant flooding creates (batches of 100) as fast as the kernel takes them."""

    role = "noisy"
    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.created: list[Expected] = []

    @task(10)
    def flood(self) -> None:
        if not self.ref:
            return
        n = random.randint(10, 1000)
        batch = [pb.CreateRequest(tenant=self.tenant, workflow="Quick", code=self.ref, params_json=json.dumps({"n": n}))
                 for _ in range(100)]  # fmt: skip

        def check(response: Any) -> str:
            if len(response.instances) != 100:
                return f"CreateBatch of 100 answered {len(response.instances)} instances"
            return next((w for i in response.instances if (w := self._created("Quick")(i))), "")

        # The per-tenant create rate refuses a flood: that is the quota working, not a failure.
        response = self.call("CreateBatch", self.workflows.CreateBatch, pb.CreateBatchRequest(requests=batch), check,
                             expected_codes=(grpc.StatusCode.RESOURCE_EXHAUSTED,))  # fmt: skip
        if response is not None and random.random() < 0.1:
            self.created.append(Expected(response.instances[0].id, sum(range(n)), 0.0))
        else:
            time.sleep(0.05)  # refused: back off a little, as a real client would

    @task(1)
    def check_one(self) -> None:
        """The flood's own instances complete too (later: they queue behind each other)."""
        if self.created:
            expected = self.created.pop(0)
            expected.since = expected.since or time.time() + 60.0  # its backlog may be long
            if self.check_done(expected) is None:
                self.created.append(expected)


class SoakTenant(TenantUser):
    """A steady mix: create, get, list, send event, watch to the end."""

    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        super().on_start()
        self.waiting: list[tuple[str, int]] = []
        self.paid: list[Expected] = []

    @task(3)
    def create_order(self) -> None:
        if not self.ref:
            return
        items = [random.randint(1, 9) for _ in range(3)]
        if id := self.create("Order", {"items": items}):
            self.waiting.append((id, sum(items)))

    @task(2)
    def get(self) -> None:
        if self.waiting:
            id, total = random.choice(self.waiting)
            self.check_hibernating(id, "price", total)

    @task(1)
    def list_instances(self) -> None:
        def check(page: Any) -> str:
            if len(page.instances) > 50:
                return f"List returned {len(page.instances)} instances; the default page is 50"
            strangers = [i.id for i in page.instances if i.tenant != self.tenant]
            return (
                f"List of {self.tenant} returned other tenants' instances {strangers[:3]}"
                if strangers
                else ""
            )

        self.call("List", self.workflows.List, pb.ListRequest(tenant=self.tenant), check)

    @task(2)
    def send_event(self) -> None:
        if len(self.waiting) > 1:
            id, total = self.waiting.pop(0)
            if self.send_paid(id):
                self.paid.append(Expected(id, {"total": total, "paid": {"card": "ok"}}, time.time()))

    @task(1)
    def watch(self) -> None:
        """Watch a paid instance to its end; its last status must be COMPLETE, then its output right."""
        if not self.paid:
            return
        expected = self.paid.pop(0)
        started = time.perf_counter()
        last, error = pb.STATUS_UNSPECIFIED, None
        try:
            for event in self.workflows.Watch(
                pb.InstanceRef(tenant=self.tenant, id=expected.id), timeout=COMPLETE_WITHIN
            ):
                if event.kind == "status":
                    last = event.status
                    if last in TERMINAL:
                        break
        except grpc.RpcError as exc:
            error = exc
        if error is None and last != pb.STATUS_COMPLETE:
            error = WrongAnswer(f"Watch of {expected.id} ended at {status_name(last)}, expected COMPLETE")
        self.report("Watch", started, error)
        if error is None:
            self.check_done(expected)


SCENARIOS: dict[str, list[type[User]]] = {
    "density": [DensityTenant],
    "noisy": [NoisyTenant, QuietTenant],
    "soak": [SoakTenant],
}
