"""A List page read in chunks within a byte cap and the kernel's response budget (kernel/pages.py)."""

from __future__ import annotations

import asyncio

import pytest

from tenantflow.kernel.admission import MIB, BytesInFlight
from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.pages import read_page

WORST = 2 * MIB


async def page(
    budget: BytesInFlight, sizes: list[int], want: int, token: str = ""
) -> tuple[list[int], str, int]:
    """The page's indexes, its token, and the budget it held while built."""
    items = list(enumerate(sizes))  # (index, bytes)

    async def read(limit: int, token: str) -> tuple[list[tuple[int, int]], str]:
        start = int(token or 0)
        end = min(start + limit, len(items))
        return items[start:end], (str(end) if end < len(items) else "")

    async with read_page(budget, read, want, token, WORST, lambda item: item[1], "lists") as (found, after):
        return [i for i, _ in found], after, budget.used


def test_a_small_page_never_asks_the_budget() -> None:
    budget = BytesInFlight(4 * MIB)
    budget.take(4 * MIB)  # full: another caller holds it all
    found, token, _ = asyncio.run(page(budget, [100] * 60, want=50))
    assert found == list(range(50)) and token == "50"


def test_a_large_page_holds_its_bytes_until_built_and_gives_them_back() -> None:
    budget = BytesInFlight(32 * MIB)
    found, token, held = asyncio.run(page(budget, [MIB] * 40, want=50))
    assert found == list(range(14)) and token == "14"  # ends at 16 MiB less the largest item
    assert held == 14 * MIB and budget.used == 0


def test_a_short_budget_ends_the_page_early_and_refuses_a_first_chunk() -> None:
    budget = BytesInFlight(32 * MIB)
    budget.take(22 * MIB)
    found, token, held = asyncio.run(page(budget, [MIB] * 40, want=50))
    assert found == list(range(8)) and token == "8" and held == 30 * MIB  # the next chunk did not fit
    assert budget.used == 22 * MIB
    budget.take(6 * MIB)
    with pytest.raises(ResourceExhausted, match="too many large lists are being read at once"):
        asyncio.run(page(budget, [MIB] * 40, want=50, token="8"))
    assert budget.used == 28 * MIB  # nothing kept by the refused page
