"""Child workflows, kernel side: the ``create`` and ``wait_instance`` step kinds.

``step.create`` starts an instance of the *calling* tenant: the kernel stamps the tenant from the
parent's record, so no argument can name another one, and it goes through the same create path as
the API (validation, pinning, creation rate, live cap). It is a durable step: the child's id is
derived from the parent's id, generation and step key unless the workflow names one, so a replay
after a crash finds the child it already made instead of starting a second one.

A child records its parent (``InstanceRecord.parent``). When it ends, the commit that ends it
carries an event of type ``tenantflow.child-ended:<id>`` into the parent's inbox in the same
transaction (a committer unit: never split, whatever the batching or retries), which wakes a parent hibernating in ``step.wait_for_instance``. The event is only a
wake-up: the outcome is always read from the child's own record.

Known gap: if Terminate lands while ``step.create`` is creating a child, after the child is stored
but before the parent's create step commits (that commit then fails on the bumped generation), the
child is in no journal and keeps running; find it by its ``parent`` link and terminate it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from tenantflow.kernel import guestdata, stepkinds, validate
from tenantflow.kernel.errors import (
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    TenantflowError,
)
from tenantflow.kernel.journal import CHILD_EVENT, Journal
from tenantflow.kernel.model import TERMINAL, HistoryEntry, InstanceRecord, Status, StepRecord


def child_id(parent: InstanceRecord, key: str) -> str:
    """The id ``step.create`` gives a child when the workflow names none: the same for every replay
    of one run, new after a restart (which bumps the parent's generation)."""
    digest = hashlib.sha256(f"{parent.tenant}\0{parent.id}\0{parent.generation}\0{key}".encode()).hexdigest()
    return f"{parent.id[:75]}-{digest[:24]}"


def check_child_ref(parent: InstanceRecord, ref: str) -> None:
    """A child runs code of its parent's tenant only: an artifact of that tenant, or another
    revision or path of the repository the parent's own code comes from."""
    if ref.startswith("artifact://"):
        owner = ref[len("artifact://") :].split("/", 1)[0]
        if owner != parent.tenant:
            raise PermissionDenied(
                f"step.create cannot run {ref!r}: it belongs to tenant {owner!r}; a child runs code of "
                f"its own tenant ({parent.tenant!r}) only"
            )
        return
    if ref.rsplit("@", 1)[0] != parent.code.rsplit("@", 1)[0]:
        raise PermissionDenied(
            f"step.create cannot run {ref!r}: name an artifact of tenant {parent.tenant!r} "
            "(artifact://<tenant>/<name>) or another revision of the repository this workflow's code comes from"
        )


def child_ids(steps: list[StepRecord]) -> list[str]:
    """The instances a parent started, in step order."""
    return [json.loads(s.output_json) for s in steps if s.kind == "create" and s.status == "complete"]


# -- step kinds -------------------------------------------------------------------------------------
def _optional_text(m: dict[str, Any], field: str) -> str:
    value = m.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    return value


async def create(journal: Journal, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    answer = stepkinds.not_now(journal, step)
    if answer is not None:
        return answer
    policy = guestdata._policy(m["policy"])
    workflow, code = str(m["workflow"]), _optional_text(m, "code")
    params = guestdata._strict_json(m.get("params"))
    rec = journal.record
    id = _optional_text(m, "id") or child_id(rec, step.key)
    step.attempts += 1
    error: dict[str, str] | None = None
    retryable = False
    if params is None:
        error = guestdata._not_json("step.create was given params holding")
    else:
        try:
            child = await journal.spawn(rec, workflow, code, params, id)
        except AlreadyExists:
            existing = await journal.instance(id)
            if existing is None or existing.parent != rec.id:  # not ours: never adopt another instance
                error = {"name": "AlreadyExists", "message": (
                    f"instance {id!r} already exists and was not started by this workflow: pass another id")}  # fmt: skip
        except ResourceExhausted as exc:  # a quota: worth another attempt later
            error, retryable = {"name": "QuotaExceeded", "message": str(exc)}, True
        except TenantflowError as exc:
            error = {"name": type(exc).__name__, "message": str(exc)}
        else:
            id = child.id
    if error is not None:
        history = stepkinds.fail_attempt(journal, step, policy, error, retryable=retryable)
        await journal.commit(journal.change(steps=[step], history=history))
        if step.status == "failed":
            return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message}}
        assert step.wake_at is not None
        journal.wakes.append(step.wake_at)
        return stepkinds.suspend_for_pause(journal) if journal.pause_requested else {"do": "suspend"}
    now = journal.now()
    step.status, step.output_json, step.updated_at = "complete", json.dumps(id), now
    step.error_name = step.error_message = ""
    data = json.dumps({"child": id, "workflow": workflow})
    history = [
        HistoryEntry(kind="child_created", at=now, step=step.name, message=f"started {workflow} as {id}", data_json=data),
        HistoryEntry(kind="step_completed", at=now, step=step.name, attempt=step.attempts),
    ]  # fmt: skip
    await journal.commit(journal.change(steps=[step], history=history))
    return {"do": "return", "value": id}


def _outcome(child: InstanceRecord | None, id: str, parent: str) -> tuple[str, str] | None:
    """(error name, message) for a child that failed or cannot be waited for; None if it completed."""
    if child is None:
        return "InstanceNotFound", f"instance {id!r} does not exist (or was deleted)"
    if child.parent != parent:
        return "NotAChild", (f"instance {id!r} was not started by this workflow: wait_for_instance waits "
                             "for instances this workflow created with step.create")  # fmt: skip
    if child.status == Status.ERRORED:
        return "InstanceErrored", f"instance {id!r} errored: {child.error_name}: {child.error_message}"
    if child.status == Status.TERMINATED:
        return "InstanceTerminated", f"instance {id!r} was terminated"
    return None


async def wait(journal: Journal, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    settled = stepkinds.settled(journal, step)
    if settled is not None:
        return settled
    id = m["id"]
    if not isinstance(id, str) or not validate.ID.fullmatch(id):
        raise ValueError(f"bad instance id {id!r}")
    now = journal.now()
    rec = journal.record
    if step.status == "new":
        step.status, step.event_type, step.wake_at = (
            "waiting",
            CHILD_EVENT + id,
            stepkinds.deadline(journal, m, now),
        )
        entry = journal.history("waiting", step, message=f"for instance {id} to end",
                              data_json=json.dumps({"child": id, "timeout_at": step.wake_at}))  # fmt: skip
        journal.submit(journal.change(steps=[dataclasses.replace(step)], history=[entry]))
    child = await journal.instance(id)
    problem = _outcome(child, id, rec.id)
    ended = problem is not None or (child is not None and child.status in TERMINAL)
    assert step.wake_at is not None
    stale: list[tuple[int, str]] = []
    if not ended and step.wake_at > now:
        # A notice of a child not ended is stale (its end was refused, or the child was restarted):
        # left unconsumed it would journal the suspended parent again and again. A child's end commits
        # with its notice, so if the child is still not ended after the notice was read, it is stale.
        stale = [(e.seq, step.key) for e in await journal.take_events(step.event_type)]
        if stale:
            child = await journal.instance(id)
            problem = _outcome(child, id, rec.id)
            ended = problem is not None or (child is not None and child.status in TERMINAL)
    if not ended and step.wake_at > now:
        if stale:
            journal.submit(journal.change(consume_events=stale))
        journal.wakes.append(step.wake_at)
        journal.wait_types.add(step.event_type)
        journal.hibernating = True
        return {"do": "suspend"}
    if not ended:
        problem = "InstanceTimeout", f"instance {id!r} did not end before the time-out"
    # The notice only wakes the parent (the outcome is read from the child's record): this step
    # consumes every one not taken by another step of this run, stale ones included.
    consumed = [*stale, *((e.seq, step.key) for e in await journal.take_events(step.event_type))]
    step.updated_at = now
    if problem is None:
        assert child is not None
        step.status, step.output_json = "complete", child.output_json or "null"
        entry = journal.history("step_completed", step, message=f"instance {id} completed")
        await journal.commit(journal.change(steps=[step], consume_events=consumed, history=[entry]))
        return {"do": "return", "value": json.loads(step.output_json)}
    step.status, (step.error_name, step.error_message) = "failed", problem
    entry = journal.history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
    await journal.commit(journal.change(steps=[step], consume_events=consumed, history=[entry]))
    return {
        "do": "raise",
        "error": {"name": step.error_name, "message": step.error_message, "type": step.event_type},
    }


KINDS: dict[str, Callable[[Journal, StepRecord, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "create": create,
    "wait_instance": wait,
}
