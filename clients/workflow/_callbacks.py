"""How a step callback is called: with its context when it takes one, to completion on any thread."""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Callable
from typing import Any

from tenantflow.workflow import _tools
from tenantflow.workflow._api import StepContext
from tenantflow.workflow._loop import GuestLoop


def invoke(fn: Callable[..., Any], key: str, attempt: int) -> Any:
    name, _, occurrence = key.rpartition("#")
    name, count = (name, int(occurrence) + 1) if occurrence.isdecimal() else (key, 1)
    if not callable(fn):
        raise TypeError(f"step {name!r}: expected a callable, got {type(fn).__name__}")
    kv, secrets = _tools.begin(key, attempt)  # closed by the attempt's outcome (Core.outcome)
    return fn(StepContext(name, attempt, count, kv, secrets)) if wants_context(fn) else fn()


def wants_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a positional parameter without a default (it gets the step context)."""
    if type(fn) is types.FunctionType and not hasattr(fn, "__wrapped__") and not hasattr(fn, "__signature__"):
        # What inspect.signature says, read off the code object (it was most of a trivial step's cost).
        return fn.__code__.co_argcount > len(fn.__defaults__ or ())
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params.values()
    )


async def _await(value: Any) -> Any:
    return await value


def call_blocking(fn: Callable[..., Any], name: str, attempt: int) -> Any:
    """Call a step callback to completion (an async callback in a sync context gets its own loop)."""
    value = invoke(fn, name, attempt)
    if inspect.isawaitable(value):
        loop = GuestLoop(threads=False)  # type: ignore[abstract]
        return loop.run(_await(value)).result()
    return value


def call_inline(fn: Callable[..., Any], key: str, attempt: int) -> Any:
    """:func:`call_blocking` on the workflow's own thread (an awaitable it returns still gets a
    loop of its own, as on a worker thread; the workflow's loop is restored after)."""
    value = invoke(fn, key, attempt)
    if not inspect.isawaitable(value):
        return value
    outer = asyncio.events._get_running_loop()
    try:
        return GuestLoop(threads=False).run(_await(value)).result()  # type: ignore[abstract]
    finally:
        asyncio.events._set_running_loop(outer)
