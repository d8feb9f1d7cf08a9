"""The sandbox contract: run one wake-up of a tenant's workflow in isolation.

The sandbox carries messages between the guest runtime (``tenantflow.workflow._runtime``) and the
kernel's :class:`Host`; it decides nothing itself. Killing a run is cancelling its task: the
sandbox must then stop the guest for good (kill the process, drop the store) before returning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

CONTRACT_VERSION = 1  # bumped when a change breaks sandboxes written against it (kernel/contracts.py)


class CodeError(Exception):
    """Tenant code that cannot be accepted (syntax error, unsupported feature); names file and line."""


@dataclass(frozen=True)
class CodeWarning:
    """Something in accepted tenant code a person should look at (see ``CodeWarning`` in the .proto)."""

    file: str
    line: int
    kind: str  # clock | random | uuid | io | event_mutation | dynamic_step_name | ignored_class
    message: str


HAZARDS = frozenset(
    {"clock", "random", "uuid", "io", "event_mutation", "dynamic_step_name"}
)  # refused by strict


@dataclass(frozen=True)
class Inspection:
    """What a sandbox's check found in tenant code: ``{workflow class: module}``, and warnings."""

    workflows: dict[str, str]
    warnings: tuple[CodeWarning, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Resource limits every sandbox enforces as best it can.

    ``cpu_seconds`` is per step: the CPU a guest may use between two host calls (one step attempt,
    or the workflow code between steps), so a long workflow is not cut off by its total.
    ``wall_seconds`` bounds a whole wake-up. ``message_bytes`` bounds one message from the guest
    (its JSON as the guest encoded it): a sandbox checks the length the guest announces *before*
    reading or decoding the message, and a larger one fails the run at once. The kernel sets it to
    its output limit plus :data:`ENVELOPE_BYTES`."""

    memory_bytes: int = 512 * 1024 * 1024  # per run
    cpu_seconds: float = 60.0
    open_files: int = 64
    wall_seconds: float = 3600.0  # a whole wake-up, a backstop behind per-step time-outs
    message_bytes: int = 1024 * 1024 + 64 * 1024  # one guest message: 1 MiB of output + envelope


ENVELOPE_BYTES = 64 * 1024  # a message's room beyond the output it carries (names, keys, error text)


@dataclass(frozen=True)
class RunExit:
    """How a run ended. ``crashed`` means the guest died without reporting ``finish``/``suspend``."""

    crashed: bool
    detail: str = ""


class Host(Protocol):
    """The kernel side of the step protocol (see ``kernel/executor.py``)."""

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Handle a guest request; the reply is sent back to the guest."""
        ...

    async def notify(self, message: dict[str, Any]) -> None:
        """Handle a guest message that expects no reply (log lines), once :meth:`admit` took it."""
        ...

    def admit(self, size: int) -> bool:
        """Charge a guest notification of ``size`` bytes to the log budgets, before it is decoded;
        callable from any thread. False: drop it unread (the host counted it, and stops a run that
        keeps flooding far past its budget)."""
        ...


class Sandbox(Protocol):
    """A sandbox for one ``runtime`` name (``python``, ``python-wasm``, ``wasm`` ...)."""

    runtime: str

    def inspect(self, files: Mapping[str, bytes]) -> dict[str, str] | Inspection:
        """Check tenant code without running it; return ``{workflow class: module}``, or an
        :class:`Inspection` that also carries warnings (determinism hazards, ignored classes).

        Tenant code is hostile input: parse, compile or validate it in a limited child process
        (``tenantflow.plugins.sandboxing.isolated``), never in the kernel. Raise :class:`CodeError` naming file
        and line for code this sandbox cannot run, and ``errors.ResourceExhausted`` when checking it
        hits a CPU, memory or time limit. Called from a thread; checks of different tenants run at
        once."""
        ...

    async def start(self) -> None:
        """Prepare (warm templates, compile caches). Called once before any run."""
        ...

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        """Run the guest for ``job`` until it reports finish/suspend or dies.

        ``job``: ``tenant`` and ``code`` (the pinned ref: whose code, which version; a sandbox
        that keeps a process warm between wake-ups keys it by both, never serving another tenant),
        ``files`` ({path: bytes}), ``module`` (to import), ``workflow`` (class name),
        ``event`` ({payload, instance_id, timestamp}) and ``journal`` (recorded steps, in order:
        {key, name, kind, status, value?, error?}), and ``ahead`` (new steps may run ahead of
        their grant, where the transport allows). The guest runtime's messages and the host's
        replies are documented in ``tenantflow.workflow._runtime``."""
        ...

    async def close(self) -> None: ...
