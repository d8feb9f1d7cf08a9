"""A List page read in chunks, bounded in bytes and held in the kernel's response budget."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from tenantflow.kernel.admission import MIB, BytesInFlight
from tenantflow.kernel.errors import ResourceExhausted

R = TypeVar("R")

LIGHT_RESPONSE_BYTES = 1024 * 1024  # a response with fewer bytes of payloads is built without the budget
LIST_PAGE_BYTES = 16 * 1024 * 1024  # of params, outputs and errors in one List page


@contextlib.asynccontextmanager
async def read_page(
    budget: BytesInFlight,
    read: Callable[[int, str], Awaitable[tuple[list[R], str]]],
    want: int,
    token: str,
    worst: int,
    size: Callable[[R], int],
    what: str,
) -> AsyncIterator[tuple[list[R], str]]:
    """Up to ``want`` items from ``token`` on, and the token of the rest ("" at the end), held in
    ``budget`` until the block ends (build the response inside it).

    ``read(limit, token)`` reads a chunk; chunks are sized so that one fits ``LIST_PAGE_BYTES`` even
    if every item is ``worst`` bytes, and the page ends once it holds about that much. A page past
    ``LIGHT_RESPONSE_BYTES`` takes each chunk's actual bytes from ``budget`` as it is read; when the
    budget is short the page ends before that chunk (its token resumes there), and a first chunk
    that does not fit is ResourceExhausted. One caller alone always fits."""
    items: list[R] = []
    used = held = 0
    try:
        while True:
            room = max(1, (LIST_PAGE_BYTES - used) // worst)
            chunk, after = await read(min(want - len(items), room), token)
            got = sum(size(r) for r in chunk)
            if used + got > LIGHT_RESPONSE_BYTES:
                if not budget.take(used + got - held):
                    if items:
                        break
                    raise ResourceExhausted(
                        f"too many large {what} are being read at once ({budget.used / MIB:.0f} MiB); "
                        "retry in a few seconds, or ask for a smaller page_size"
                    )
                held = used + got
            items, used, token = items + chunk, used + got, after
            if not token or len(items) >= want or used >= LIST_PAGE_BYTES - worst:
                break
        yield items, token
    finally:
        budget.give(held)
