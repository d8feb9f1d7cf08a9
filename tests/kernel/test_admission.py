"""Read slots (kernel/admission.py): bodies gRPC may be receiving at once, shared fairly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from tenantflow.kernel import metrics
from tenantflow.kernel.admission import MIB, Budgets, ReadSlots, request_limits
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.server import Gate
from tenantflow.v1 import tenantflow_pb2 as pb


def test_the_largest_request_is_a_16_mib_batch_and_the_default_budget_holds_16_reads() -> None:
    config = KernelConfig()
    assert request_limits(config)["Workflows/CreateBatch"] == 16 * MIB
    budgets = Budgets.of(config)
    assert budgets.largest == 16 * MIB
    assert (budgets.reads.slots, budgets.reads.share) == (16, 4)


def test_a_caller_past_its_share_waits_then_is_refused_while_another_reads() -> None:
    asyncio.run(_past_share())


async def _past_share() -> None:
    slots = ReadSlots(slots=4, share=2, wait=0.2)
    async with slots.hold("a", "token 'a'"), slots.hold("a", "token 'a'"):
        with pytest.raises(
            ResourceExhausted, match="token 'a' has 2 request bodies being received, its share is 2"
        ):
            async with slots.hold("a", "token 'a'"):
                pass
        async with slots.hold("b", "token 'b'"):  # another caller is not refused meanwhile
            assert slots.by_caller == {"a": 2, "b": 1}
    assert slots.used == 0 and slots.by_caller == {}


def test_a_waiting_read_gets_the_slot_another_frees() -> None:
    asyncio.run(_freed())


async def _freed() -> None:
    slots = ReadSlots(slots=1, share=1, wait=5.0)
    first = asyncio.Event()

    async def reader(name: str) -> str:
        async with slots.hold(name, name):
            first.set()
            await asyncio.sleep(0)
        return name

    async with slots.hold("a", "a"):
        waiting = asyncio.create_task(reader("b"))
        await asyncio.sleep(0.05)
        assert not first.is_set()  # no slot: it waits
    assert await asyncio.wait_for(waiting, 5) == "b"


class _Sender:
    """A gRPC-like caller whose body arrives after ``delay`` seconds (None: never)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay

    def metadata(self) -> list[tuple[str, str]]:
        return []

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def declared_size(self) -> None:
        return None  # as gRPC: the size is known once the message is in

    async def read(self) -> bytes:
        await asyncio.sleep(1e9 if self.delay is None else self.delay)
        return pb.InstanceRef(tenant="t", id="i").SerializeToString()

    def decode(self, data: bytes) -> pb.InstanceRef:
        return pb.InstanceRef.FromString(data)


def test_a_body_that_does_not_arrive_gives_its_read_slot_back() -> None:
    asyncio.run(_slow_sender())


async def _slow_sender() -> None:
    budgets = Budgets.of(KernelConfig())
    budgets = dataclasses.replace(budgets, reads=ReadSlots(slots=2, share=2, wait=5.0, deadline=0.3))
    gate = Gate(budgets, None, {})

    async def admit(sender: _Sender) -> pb.InstanceRef:
        with contextlib.ExitStack() as held:
            rpc = metrics.RpcCall()
            await gate.admit("Workflows/Get", sender, held, rpc)
            return rpc.request  # type: ignore[no-any-return]

    stalled = [asyncio.create_task(admit(_Sender(None))) for _ in range(2)]  # both slots taken
    await asyncio.sleep(0.05)
    assert budgets.reads.used == 2
    got = await admit(_Sender(0.0))  # waits for a slot the stalled reads must give back
    assert got.id == "i"
    for task in stalled:
        with pytest.raises(ResourceExhausted, match="did not arrive within 0.3 s"):
            await task
    assert budgets.reads.used == 0
