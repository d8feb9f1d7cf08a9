"""Tenant density under load: every locust user is a tenant with its own code.

Each user publishes its own workflow (a never-seen tenant for the kernel), then keeps creating
instances that run a step, hibernate on ``wait_for_event`` and finish when the user sends the
event. Measured per RPC by locust; the kernel's RSS and its hibernating-instance count tell the
density. Run against a kernel you started (``tenantflow serve``):

    .venv/bin/pip install -e '.[load]'
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 200 -r 20 -t 60s --host 127.0.0.1:7450
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task

from tenantflow.v1 import tenantflow_pb2 as pb
from tenantflow.v1 import tenantflow_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()

CODE = """
from tenantflow.workflow import WorkflowEntrypoint

class Order(WorkflowEntrypoint):
    async def run(self, event, step):
        total = await step.do("price", lambda: sum(event.payload["items"]))
        paid = await step.wait_for_event("payment", type="paid", timeout="1 hour")
        return await step.do("ship", lambda: {"total": total, "paid": paid["payload"]})
"""
_tenants = itertools.count()


class TenantUser(User):
    """One tenant: its own code, its own instances, its own events."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.workflows = pb_grpc.WorkflowsStub(self.channel)
        self.code = pb_grpc.CodeStub(self.channel)
        self.tenant = f"load-{next(_tenants)}-{random.getrandbits(32):08x}"
        files = {"order.py": (CODE + f"\n# tenant {self.tenant}\n").encode()}
        self.ref = self.call(
            "Publish", self.code.Publish, pb.PublishRequest(tenant=self.tenant, name="order", files=files)
        ).ref
        self.waiting: list[str] = []

    def on_stop(self) -> None:
        self.channel.close()

    def call(self, name: str, method: Callable[..., Any], request: Any) -> Any:
        started = time.perf_counter()
        response, error = None, None
        try:
            response = method(request, timeout=30)
        except grpc.RpcError as exc:
            error = exc
        events.request.fire(request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
                            response_length=response.ByteSize() if response is not None else 0, exception=error,
                            context={})  # fmt: skip
        return response

    @task(3)
    def create(self) -> None:
        request = pb.CreateRequest(
            tenant=self.tenant, workflow="Order", code=self.ref, params_json='{"items": [1, 2, 3]}'
        )
        instance = self.call("Create", self.workflows.Create, request)
        if instance is not None:
            self.waiting.append(instance.id)

    @task(2)
    def pay(self) -> None:
        if self.waiting:
            id = self.waiting.pop(0)
            request = pb.SendEventRequest(
                tenant=self.tenant, id=id, type="paid", payload_json='{"card": "ok"}'
            )
            self.call("SendEvent", self.workflows.SendEvent, request)

    @task(1)
    def status(self) -> None:
        if self.waiting:
            self.call(
                "Get", self.workflows.Get, pb.InstanceRef(tenant=self.tenant, id=random.choice(self.waiting))
            )
