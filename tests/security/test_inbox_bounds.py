"""An instance's inbox is bounded and cheap to wait on (issue 16, "an inbox without bounds").

300 events of 1 MB sent to one waiting instance took kernel RSS 69 -> 668 MiB and rising: every
event woke the instance, and every wake-up loaded every unread event. Now an instance holds at most
``--max-inbox-events`` unread events and ``--max-inbox-mb`` of them (SendEvent past either:
RESOURCE_EXHAUSTED, counted in the transaction that stores the event), a wait reads only the event
it consumes, and only an event of a type the instance waits for wakes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for
from tests.security.bystander import bystander_completes
from tests.security.test_kernel_limits import PeakRss

MiB = 1024 * 1024

PATIENT = """
from tenantflow.workflow import WorkflowEntrypoint

class Patient(WorkflowEntrypoint):
    def run(self, event, step):
        got = []
        for i in range(3):
            got.append(step.wait_for_event(f"go{i}", type="go", timeout="1 hour").payload)
        return got
"""

TWO_TYPES = """
from tenantflow.workflow import WorkflowEntrypoint

class TwoTypes(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.wait_for_event("a", type="a", timeout="1 hour")
        b = step.wait_for_event("b", type="b", timeout="1 hour")
        return [a.payload, b.payload]
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    """A kernel of this test's own, with the default inbox caps (1,000 events, 16 MiB)."""
    k = KernelProcess(tmp_path / "kernel", TEST_LIMITS)
    k.start()
    yield k
    k.stop()


def timeline(client: Client, tenant: str, id: str, seconds: float = 2.0) -> list[pb.WatchEvent]:
    """The instance's history so far (a Watch cut off after ``seconds`` if it has not ended)."""
    seen: list[pb.WatchEvent] = []
    try:
        for event in client.watch(tenant, id, timeout=seconds):
            seen.append(event)
    except TenantflowRpcError as exc:
        assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    return seen


def wake_ups(events: list[pb.WatchEvent]) -> int:
    """How many times the instance was woken: each wake-up of a waiting instance marks it running."""
    return sum(1 for e in events if e.kind == "status" and e.status == pb.STATUS_RUNNING)


def is_waiting(client: Client, tenant: str, id: str) -> Callable[[], bool]:
    return lambda: client.get(tenant, id).status == pb.STATUS_WAITING


def test_a_flood_of_large_events_is_capped_and_the_instance_still_gets_its_own(
    kernel: KernelProcess, tenant: str
) -> None:
    assert kernel.proc is not None
    with kernel.client() as client:
        bystander_completes(client, f"{tenant}-warm", within=30)  # sandboxes warm before measuring
        ref = publish(client, tenant, PATIENT)
        inst = client.create(tenant, "Patient", ref)
        wait_for(is_waiting(client, tenant, inst.id))
        noise = "x" * 1_000_000  # 1,000,002 bytes of JSON; with its type, 1,000,007 in the inbox

        def send(n: int) -> str:
            with Client(kernel.address) as c:
                try:
                    c.send_event(tenant, inst.id, "noise", noise)
                    return "stored"
                except TenantflowRpcError as exc:
                    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    return str(exc)

        with PeakRss(kernel.proc.pid) as memory, ThreadPoolExecutor(8) as pool:
            sends = [pool.submit(send, n) for n in range(300)]
            took = bystander_completes(client, tenant, within=10)
            results = [s.result() for s in sends]
        grew = memory.peak - memory.start
        refused = [r for r in results if r != "stored"]
        print(f"300 sends of 1 MB: {results.count('stored')} stored, {len(refused)} refused; "
              f"kernel RSS +{grew / MiB:.0f} MiB; bystander {took:.2f} s")  # fmt: skip
        assert results.count("stored") == 16, results.count("stored")  # 16 x 1,000,007 <= 16 MiB < 17 x
        assert "the inbox of instance" in refused[0] and "16 events (15.3 MiB) are waiting" in refused[0]
        assert "must consume events" in refused[0] and "--max-inbox-mb" in refused[0], refused[0]
        assert grew < 300 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB"  # before: +589 MiB, rising
        assert client.get(tenant, inst.id).status == pb.STATUS_WAITING  # nobody waits for noise

        # A small event still fits (by bytes), wakes the instance, and its wait finds it among the
        # 16 MB it does not read; each in order, each once.
        for n in range(3):
            client.send_event(tenant, inst.id, "go", {"n": n})
            if n < 2:
                wait_for(lambda n=n: len([s for s in client.get(tenant, inst.id).steps  # type: ignore[misc]
                                         if s.status == "complete"]) == n + 1)  # fmt: skip
                wait_for(is_waiting(client, tenant, inst.id))
        done = client.wait(tenant, inst.id, timeout=30)
        assert done.status == pb.STATUS_COMPLETE, done
        assert Client.output(done) == [{"n": 0}, {"n": 1}, {"n": 2}]
        history = timeline(client, tenant, inst.id)
        assert wake_ups(history) == 4, [(e.kind, e.status) for e in history]  # its start and one per go
        assert sum(1 for e in history if e.kind == "event") == 16 + 3


def test_an_event_nobody_waits_for_wakes_nobody_and_a_later_wait_finds_it(
    kernel: KernelProcess, tenant: str
) -> None:
    with kernel.client() as client:
        ref = publish(client, tenant, TWO_TYPES)
        inst = client.create(tenant, "TwoTypes", ref)
        wait_for(is_waiting(client, tenant, inst.id))
        client.send_event(tenant, inst.id, "b", "sent first")
        before = timeline(client, tenant, inst.id, seconds=1.5)  # time enough to be woken, were it
        assert wake_ups(before) == 1, [(e.kind, e.status) for e in before]  # its start only
        assert client.get(tenant, inst.id).status == pb.STATUS_WAITING
        client.send_event(tenant, inst.id, "a", "sent second")
        done = client.wait(tenant, inst.id, timeout=30)
        assert done.status == pb.STATUS_COMPLETE, done
        assert Client.output(done) == ["sent second", "sent first"]  # events sent before a wait are kept
        history = timeline(client, tenant, inst.id)
        statuses = [e.status for e in history if e.kind == "status"]
        # Woken once, by "a"; the wait for "b" found its event at once, without hibernating again.
        assert statuses.count(pb.STATUS_RUNNING) == 2 and statuses.count(pb.STATUS_WAITING) == 1, statuses
        bystander_completes(client, tenant)


def test_refused_events_are_freed_at_once(kernel: KernelProcess, tenant: str) -> None:
    """A SendEvent refused by the inbox cap kept its 1 MB request and payload in a reference cycle
    (grpc's abort error, the kernel's, their frames) until a full collection: 300 refused sends to a
    full inbox grew kernel RSS by +136 MiB and more with every round. Now they cost a few MiB."""
    assert kernel.proc is not None
    with kernel.client() as client:
        ref = publish(client, tenant, PATIENT)
        inst = client.create(tenant, "Patient", ref)
        wait_for(is_waiting(client, tenant, inst.id))
        noise = "x" * 1_000_000
        clients = [Client(kernel.address) for _ in range(8)]

        def send(n: int) -> bool:
            try:
                clients[n % 8].send_event(tenant, inst.id, "noise", noise)
                return True
            except TenantflowRpcError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return False

        try:
            with ThreadPoolExecutor(8) as pool:
                assert sum(pool.map(send, range(40))) == 16  # full: every later send is refused
                with PeakRss(kernel.proc.pid) as memory:
                    refused = sum(not stored for stored in pool.map(send, range(300)))
                    took = bystander_completes(client, tenant, within=10)
        finally:
            for c in clients:
                c.close()
        grew = memory.peak - memory.start
    print(f"300 refused 1 MB sends: kernel RSS +{grew / MiB:.0f} MiB; bystander {took:.2f} s")
    assert refused == 300
    assert grew < 50 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB for 300 refused sends (was +136 MiB)"
