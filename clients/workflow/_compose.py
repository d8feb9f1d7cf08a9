"""Composition in the guest runtime: child workflows (``step.create``, ``step.wait_for_instance``)
and rollbacks (the undos registered by ``step.do(..., rollback=undo)``).

Protocol additions (see ``tenantflow.kernel.children`` and ``tenantflow.kernel.rollback``)::

    {"op": "step", "kind": "create", "key", "name", "policy", "workflow", "code", "params", "id"}
        -> as ``do`` without ``run``: ``return`` (the child's id), ``raise`` or ``suspend``
    {"op": "step", "kind": "wait_instance", "key", "name", "id", "seconds"} -> as ``wait``
    {"op": "rollback", "error", "keys"} -> {"do": "rollback", "order", "error"}
    {"op": "step", "kind": "undo", "key": "<forward key>#undo", "name", "policy"} -> as ``do``
    {"op": "rolled_back"} -> ``ack``

A job that is rolling back (``job["rollback"]``: after a retry delay of an undo, or Terminate with
rollback) replays ``run`` without running any step that is not settled, then runs the undos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenantflow.workflow._api import ErrorInfo, InstanceError, RollbackContext, StepContext, WorkflowEvent
from tenantflow.workflow._durations import parse_duration

if TYPE_CHECKING:
    from tenantflow.workflow._protocol import Core

CHILD_EVENT = "tenantflow.child-ended:"
RESERVED_EVENT_PREFIX = "tenantflow."
UNDO = "#undo"
_REASONS = {
    "InstanceErrored": "errored",
    "InstanceTerminated": "terminated",
    "InstanceTimeout": "timeout",
    "InstanceNotFound": "not_found",
    "NotAChild": "not_a_child",
}


@dataclass
class Undo:
    """An undo registered by a completed ``step.do``."""

    name: str
    count: int
    fn: Callable[..., Any]
    config: dict[str, Any]
    output: Any


def register(core: Core, key: str, fn: Callable[..., Any] | None, config: Any, output: Any) -> Any:
    """Remember ``fn`` as the undo of the completed step ``key``; return ``output``."""
    if fn is not None:
        name, _, occurrence = key.rpartition("#")
        core.undos[key] = Undo(name, int(occurrence) + 1, fn, dict(config or {}), output)
    return output


def check_rollback(name: str, fn: Any, config: Any) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"step {name!r}: rollback must be a callable, got {type(fn).__name__}")
    unknown = set(config or {}) - {"retries", "timeout"}
    if unknown:
        raise ValueError(
            f"step {name!r}: unknown rollback_config option(s) {sorted(unknown)}; use retries, timeout"
        )


def event(value: Any) -> Any:
    """A received event as a :class:`WorkflowEvent` (attributes and mapping access)."""
    return WorkflowEvent(**value) if isinstance(value, dict) else value


def check_event_type(type: Any) -> None:
    if isinstance(type, str) and type.startswith(RESERVED_EVENT_PREFIX):
        raise ValueError(
            f"event types starting with {RESERVED_EVENT_PREFIX!r} are the kernel's own; pick another"
        )


def instance_error(name: str, error: dict[str, Any]) -> InstanceError:
    instance = str(error.get("type", "")).removeprefix(CHILD_EVENT)
    reason = _REASONS.get(str(error.get("name", "")), "errored")
    return InstanceError(name, instance, reason, str(error.get("message", "")))


def create_message(
    key: str, name: str, policy: dict[str, Any], workflow: str, code: str | None, params: Any, id: str | None
) -> dict[str, Any]:
    if not isinstance(workflow, str) or not workflow:
        raise ValueError(f"step {name!r}: workflow must be the name of an entrypoint class, got {workflow!r}")
    for what, value in (("code", code), ("id", id)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"step {name!r}: {what} must be a string, got {type(value).__name__}")
    return {"op": "step", "kind": "create", "key": key, "name": name, "policy": policy, "workflow": workflow,
            "code": code, "params": params, "id": id}  # fmt: skip


def wait_message(key: str, name: str, id: str, timeout: Any) -> dict[str, Any]:
    if not isinstance(id, str) or not id:
        raise ValueError(f"step {name!r}: wait_for_instance needs the id step.create returned, got {id!r}")
    seconds = parse_duration(timeout if timeout is not None else "24 hours")
    return {"op": "step", "kind": "wait_instance", "key": key, "name": name, "id": id, "seconds": seconds}


# -- rollbacks ------------------------------------------------------------------------------------
def _invoke_undo(fn: Callable[..., Any], context: RollbackContext) -> Any:
    from tenantflow.workflow._callbacks import call_blocking, wants_context

    wants = wants_context(fn)
    return call_blocking((lambda: fn(context)) if wants else fn, context.ctx.name, context.ctx.attempt)


def should_roll_back(core: Core, failed: bool) -> bool:
    """After the forward replay: whether this wake-up goes on with the rollback."""
    return core.fatal is None and (core.rollback is not None or (failed and bool(core.undos)))


def roll_back(core: Core, failure: BaseException | None) -> None:
    """Run the undos the kernel orders (last started first), each a durable step; then report the
    end, or suspend when an undo waits for a retry."""
    from tenantflow.workflow._protocol import error_dict, step_policy

    transport = core.transport
    error = (
        error_dict(failure, with_traceback=False) if failure is not None else {"name": "Error", "message": ""}
    )
    reply = transport.call({"op": "rollback", "error": error, "keys": list(core.undos)})
    info = ErrorInfo(str(reply["error"].get("name", "")), str(reply["error"].get("message", "")))
    done = {e["key"]: e for e in (core.rollback or {}).get("undos", [])}
    for forward in reply["order"]:
        undo = core.undos.get(forward)
        key = forward + UNDO
        if undo is None or done.get(key, {}).get("status") in ("complete", "failed"):
            continue  # settled in an earlier wake-up (the kernel checks every undo ran at the end)
        retry = undo.config.get("retries")
        undo_policy = step_policy(undo.name, retry, undo.config.get("timeout"))
        answer = transport.call(
            {"op": "step", "kind": "undo", "key": key, "name": undo.name, "policy": undo_policy}
        )
        while answer.get("do") == "run":
            attempt = int(answer["attempt"])
            context = RollbackContext(undo.output, info, StepContext(undo.name, attempt, undo.count))
            value: Any = None
            problem: BaseException | None = None
            try:
                value = _invoke_undo(undo.fn, context)
            except Exception as exc:
                problem = exc
            answer = transport.call(core.outcome(key, undo.name, attempt, value, problem))
        if answer.get("do") == "suspend":
            transport.call({"op": "suspend"})
            return
    transport.call({"op": "rolled_back"})
