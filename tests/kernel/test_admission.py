"""Read slots (kernel/admission.py): bodies gRPC may be receiving at once, shared fairly."""

from __future__ import annotations

import asyncio

import pytest

from tenantflow.kernel.admission import MIB, Budgets, ReadSlots, request_limits
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import ResourceExhausted


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
