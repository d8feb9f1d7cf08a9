"""Public types of the tenant SDK (see the package docstring for the determinism contract)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from tenantflow.workflow import _tools

Duration = int | float | str | _dt.timedelta


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


class InstanceError(Exception):
    """``step.wait_for_instance`` gave up on an instance: ``reason`` is ``"errored"``,
    ``"terminated"``, ``"timeout"``, ``"not_found"`` or ``"not_a_child"``."""

    def __init__(self, step: str, instance_id: str, reason: str, message: str) -> None:
        super().__init__(message or f"step {step!r}: instance {instance_id!r} {reason}")
        self.step = step
        self.instance_id = instance_id
        self.reason = reason


class NonDeterminismError(Exception):
    """The replayed workflow asked for steps the journal did not record. Fails the instance."""


class RetryPolicy(TypedDict, total=False):
    """``limit`` retries after the first attempt (0 = no retry), ``delay`` before the first retry,
    ``backoff`` constant|linear|exponential. Defaults: 5, "10 seconds", "exponential"."""

    limit: int
    delay: int | float | str | _dt.timedelta
    backoff: Literal["constant", "linear", "exponential"]


class RollbackConfig(TypedDict, total=False):
    """Retries and per-attempt timeout of an undo (defaults as for ``step.do``)."""

    retries: RetryPolicy
    timeout: Duration


@dataclass(frozen=True)
class StepContext:
    """Passed to a step callback that takes one argument: the step's ``name`` (also ``step``),
    ``attempt`` (1 for the first try) and ``count`` (1 for the first step of this name, 2 for the
    second...); ``kv``, the tenant's own key-value store (writes commit with the step's result), and
    ``secrets``, the tenant's secrets by name (``ctx.secrets["API_TOKEN"]``). Both work only while
    the callback runs."""

    step: str
    attempt: int
    count: int = 1
    kv: Any = field(default_factory=lambda: _tools.Unavailable("kv"), compare=False, repr=False)
    secrets: Any = field(default_factory=lambda: _tools.Unavailable("secrets"), compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.step

    def workspace(self) -> str:
        """The path of a writable copy-on-write tree of the code this instance is pinned to (the git
        commit's whole tree, or the published files), private to the instance and kept until it
        ends: a CI step can lint, build and test the very commit it runs for. Python runtime, on a
        kernel started with ``--workspace-root``; ``RuntimeError`` says why not otherwise."""
        return _tools.workspace(self.kv)


@dataclass(frozen=True)
class ErrorInfo:
    """An error as the kernel recorded it: the exception class name and its message."""

    name: str
    message: str


@dataclass(frozen=True)
class RollbackContext:
    """Passed to an undo (``step.do(..., rollback=undo)``): the ``output`` the step returned, the
    ``error`` that made the workflow roll back (``Terminated`` for Terminate with rollback), and
    ``ctx``, the undo's own context (the step's name and count; the undo's attempt)."""

    output: Any
    error: ErrorInfo
    ctx: StepContext


class WorkflowEvent(dict[str, Any]):
    """What ``run`` receives, and what ``step.wait_for_event`` returns: ``payload``, ``timestamp``
    (an aware datetime), and ``instance_id`` (for ``run``) or ``type`` (for an event). It is also a
    mapping of those names, with ``timestamp`` as RFC 3339 text, so ``ev["payload"]`` keeps working
    and it is JSON as it is."""

    def __init__(
        self, payload: Any = None, instance_id: str = "", timestamp: _dt.datetime | str = "", **more: Any
    ) -> None:
        when = (
            timestamp.isoformat().replace("+00:00", "Z") if isinstance(timestamp, _dt.datetime) else timestamp
        )
        fields = {"instance_id": instance_id} if instance_id else {}
        super().__init__(payload=payload, **fields, timestamp=when, **more)

    @property
    def payload(self) -> Any:
        return self.get("payload")

    @property
    def instance_id(self) -> str:
        return str(self.get("instance_id", ""))

    @property
    def type(self) -> str:
        return str(self.get("type", ""))

    @property
    def timestamp(self) -> _dt.datetime:
        return _dt.datetime.fromisoformat(str(self["timestamp"]).replace("Z", "+00:00"))


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
        rollback: Callable[..., Any] | None = None,
        rollback_config: RollbackConfig | None = None,
    ) -> Any | Awaitable[Any]:
        """Run ``fn`` once, durably: its result is committed before the workflow continues;
        failures retry per ``retries``; each attempt is stopped after ``timeout`` (default 10 minutes).
        ``rollback``: an undo, called with a :class:`RollbackContext` if ``run`` later raises (or is
        terminated with rollback) after this step completed."""
        ...

    def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> str | Awaitable[str]:
        """Start an instance of ``workflow`` in this tenant (this instance's own code unless ``code``
        names another ref of the tenant) and return its id, durably: a replay returns the same id."""
        ...

    def wait_for_instance(
        self, name: str, id: str, *, timeout: Duration | None = None
    ) -> Any | Awaitable[Any]:
        """Hibernate until instance ``id`` (started by this workflow) ends; return its output or raise
        :class:`InstanceError` (errored, terminated, or ``timeout``, default 24 hours)."""
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
    ) -> WorkflowEvent | Awaitable[WorkflowEvent]:
        """Return the first event of ``type`` sent to this instance (events sent earlier are kept)
        as a :class:`WorkflowEvent` (``ev.payload``, ``ev.type``, ``ev.timestamp``), or raise
        :class:`EventTimeoutError` after ``timeout`` (default 24 hours)."""
        ...


class WorkflowStep(Protocol):
    """``step`` of an ``async def run``: every method is awaited (see :class:`Step` for each one)."""

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        retries: RetryPolicy | None = None,
        timeout: Duration | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: RollbackConfig | None = None,
    ) -> Any:
        """Awaitable form of :meth:`Step.do`."""

    async def sleep(self, name: str, duration: Duration) -> None:
        """Awaitable form of :meth:`Step.sleep`."""

    async def sleep_until(self, name: str, when: _dt.datetime | float) -> None:
        """Awaitable form of :meth:`Step.sleep_until`."""

    async def wait_for_event(self, name: str, *, type: str, timeout: Duration | None = None) -> WorkflowEvent:
        """Awaitable form of :meth:`Step.wait_for_event`."""

    async def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> str:
        """Awaitable form of :meth:`Step.create`."""

    async def wait_for_instance(self, name: str, id: str, *, timeout: Duration | None = None) -> Any:
        """Awaitable form of :meth:`Step.wait_for_instance`."""


class BlockingStep(Protocol):
    """``step`` of a plain ``def run``: every method blocks and returns the value."""

    def do(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        retries: RetryPolicy | None = None,
        timeout: Duration | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: RollbackConfig | None = None,
    ) -> Any:
        """Blocking form of :meth:`Step.do`."""

    def sleep(self, name: str, duration: Duration) -> None:
        """Blocking form of :meth:`Step.sleep`."""

    def sleep_until(self, name: str, when: _dt.datetime | float) -> None:
        """Blocking form of :meth:`Step.sleep_until`."""

    def wait_for_event(self, name: str, *, type: str, timeout: Duration | None = None) -> WorkflowEvent:
        """Blocking form of :meth:`Step.wait_for_event`."""

    def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> str:
        """Blocking form of :meth:`Step.create`."""

    def wait_for_instance(self, name: str, id: str, *, timeout: Duration | None = None) -> Any:
        """Blocking form of :meth:`Step.wait_for_instance`."""


class WorkflowEntrypoint:
    """Subclass and implement ``run(self, event, step)``, as ``def`` or ``async def``."""

    # ``step: Any`` so subclasses may annotate it as WorkflowStep (async) or BlockingStep (def).
    def run(self, event: WorkflowEvent, step: Any) -> Any:
        """The workflow: re-executed from the top on every wake-up, with ``step`` a
        :class:`WorkflowStep` (``async def run``) or a :class:`BlockingStep` (``def run``)."""
        raise NotImplementedError("a workflow must implement run(self, event, step)")
