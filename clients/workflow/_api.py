"""Public types of the tenant SDK (see the package docstring for the determinism contract)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict


class NonRetryableError(Exception):
    """Raise from a step callback to fail the step at once, without further retries."""


class StepError(Exception):
    """A step failed for good (retries exhausted or non-retryable); raised into the workflow.

    ``error_name`` is the class name of the last failure inside the step (e.g. ``"ValueError"``).
    """

    def __init__(self, step: str, error_name: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {error_name}: {message}")
        self.step = step
        self.error_name = error_name
        self.error_message = message


class EventTimeoutError(Exception):
    """``step.wait_for_event`` reached its time-out before a matching event arrived."""

    def __init__(self, step: str, event_type: str, message: str = "") -> None:
        super().__init__(
            message or f"step {step!r}: no event of type {event_type!r} arrived before the time-out"
        )
        self.step = step
        self.event_type = event_type


class NonDeterminismError(Exception):
    """The replayed workflow asked for steps the journal did not record. Fails the instance."""


class RetryPolicy(TypedDict, total=False):
    """``limit`` retries after the first attempt (0 = no retry), ``delay`` before the first retry,
    ``backoff`` constant|linear|exponential. Defaults: 5, "10 seconds", "exponential"."""

    limit: int
    delay: int | float | str | _dt.timedelta
    backoff: Literal["constant", "linear", "exponential"]


@dataclass(frozen=True)
class StepContext:
    """Passed to a step callback that takes one argument."""

    step: str
    attempt: int


@dataclass(frozen=True)
class WorkflowEvent:
    """What ``run`` receives: the params given at create, the instance id, and its creation time."""

    payload: Any
    instance_id: str
    timestamp: _dt.datetime


class Step(Protocol):
    """The durable step API. In an ``async def run`` every method returns an awaitable;
    in a plain ``def run`` they block and return the value."""

    def do(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        retries: RetryPolicy | None = None,
        timeout: int | float | str | _dt.timedelta | None = None,
    ) -> Any | Awaitable[Any]:
        """Run ``fn`` once, durably: its result is committed before the workflow continues;
        failures retry per ``retries``; each attempt is stopped after ``timeout`` (default 10 minutes)."""
        ...

    def sleep(self, name: str, duration: int | float | str | _dt.timedelta) -> None | Awaitable[None]:
        """Hibernate for ``duration``; no process is held meanwhile."""
        ...

    def sleep_until(self, name: str, when: _dt.datetime | float) -> None | Awaitable[None]:
        """Hibernate until ``when`` (aware datetime or epoch seconds)."""
        ...

    def wait_for_event(
        self,
        name: str,
        *,
        type: str,
        timeout: int | float | str | _dt.timedelta | None = None,
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Return ``{"type", "payload", "timestamp"}`` of the first event of ``type`` sent to this
        instance (events sent earlier are kept), or raise :class:`EventTimeoutError` after
        ``timeout`` (default 24 hours)."""
        ...


class WorkflowEntrypoint:
    """Subclass and implement ``run(self, event, step)``, as ``def`` or ``async def``."""

    def run(self, event: WorkflowEvent, step: Step) -> Any:
        raise NotImplementedError("a workflow must implement run(self, event, step)")
