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

import asyncio
import dataclasses
import hashlib
import json
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tenantflow.kernel import guestdata, stepkinds, validate
from tenantflow.kernel.errors import (
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    TenantflowError,
)
from tenantflow.kernel.model import (
    TERMINAL,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    Status,
    StepRecord,
)

if TYPE_CHECKING:
    from tenantflow.kernel.wakeup import WakeUp

CHILD_EVENT = "tenantflow.child-ended:"  # + the child's id
RESERVED_EVENT_PREFIX = "tenantflow."  # event types the kernel sends itself; tenants cannot

# Child-ended events a wait step of the wake-up has taken to consume: two parallel waits on one child
# read the same unconsumed notice, and the second to consume it would fail its commit (a lost lease).
_claimed: weakref.WeakKeyDictionary[WakeUp, set[int]] = weakref.WeakKeyDictionary()

# (parent record, workflow, code ref or "" for the parent's own, params JSON, child id) -> the child
Spawn = Callable[[InstanceRecord, str, str, str, str], Awaitable[InstanceRecord]]


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


def parent_notice(record: InstanceRecord, status: Status, now: float) -> Change | None:
    """The change that tells ``record``'s parent it ended (None for an instance without one). Its
    guard fails harmlessly when the parent has ended itself."""
    if not record.parent:
        return None
    kind = CHILD_EVENT + record.id
    outcome = {"child": record.id, "status": status.name.lower()}
    return Change(
        tenant=record.tenant, id=record.parent, now=now, expect_status=frozenset(set(Status) - TERMINAL),
        add_events=[EventRecord(seq=0, type=kind, payload_json=json.dumps(outcome), created_at=now)],
        wake_on_events=[kind],
        history=[HistoryEntry(kind="child_ended", at=now, message=f"child {record.id} {outcome['status']}",
                              data_json=json.dumps(outcome))],
    )  # fmt: skip


def notify_parent(wake: WakeUp, status: Status) -> None:
    """Have the change that ends this instance (the wake-up's next commit) carry the parent's notice:
    the committer keeps them in one transaction, so no crash can end the child without telling the
    parent."""
    notice = parent_notice(wake.record, status, time.time())
    if notice is not None and not wake.aborted:
        wake.riders.append(notice)


# -- step kinds -------------------------------------------------------------------------------------
def _optional_text(m: dict[str, Any], field: str) -> str:
    value = m.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    return value


async def create(wake: WakeUp, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    answer = stepkinds.not_now(wake, step)
    if answer is not None:
        return answer
    policy = guestdata._policy(m["policy"])
    workflow, code = str(m["workflow"]), _optional_text(m, "code")
    params = guestdata._strict_json(m.get("params"))
    rec = wake.record
    id = _optional_text(m, "id") or child_id(rec, step.key)
    spawn = wake.engine.spawn
    assert spawn is not None, "the kernel sets Engine.spawn before dispatching"
    step.attempts += 1
    error: dict[str, str] | None = None
    retryable = False
    if params is None:
        error = guestdata._not_json("step.create was given params holding")
    else:
        try:
            child = await spawn(rec, workflow, code, params, id)
        except AlreadyExists:
            existing = await asyncio.to_thread(wake.engine.storage.get_instance, rec.tenant, id)
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
        history = stepkinds.fail_attempt(wake, step, policy, error, retryable=retryable)
        await wake._commit(wake._change(steps=[step], history=history))
        if step.status == "failed":
            return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message}}
        assert step.wake_at is not None
        wake.wakes.append(step.wake_at)
        return stepkinds.suspend_for_pause(wake) if wake.pause_requested else {"do": "suspend"}
    now = time.time()
    step.status, step.output_json, step.updated_at = "complete", json.dumps(id), now
    step.error_name = step.error_message = ""
    data = json.dumps({"child": id, "workflow": workflow})
    history = [
        HistoryEntry(kind="child_created", at=now, step=step.name, message=f"started {workflow} as {id}", data_json=data),
        HistoryEntry(kind="step_completed", at=now, step=step.name, attempt=step.attempts),
    ]  # fmt: skip
    await wake._commit(wake._change(steps=[step], history=history))
    return {"do": "return", "value": id}


def _claim(wake: WakeUp, events: list[EventRecord], type: str, key: str) -> list[tuple[int, str]]:
    """The notices of ``type`` no other wait step of this wake-up consumes: the event only wakes
    the parent (the outcome is read from the child's record), so one consumer is enough."""
    claimed = _claimed.setdefault(wake, set())
    mine = [e.seq for e in events if e.type == type and e.seq not in claimed]
    claimed.update(mine)
    return [(seq, key) for seq in mine]


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


async def wait(wake: WakeUp, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    settled = stepkinds.settled(wake, step)
    if settled is not None:
        return settled
    id = m["id"]
    if not isinstance(id, str) or not validate.ID.fullmatch(id):
        raise ValueError(f"bad instance id {id!r}")
    now = time.time()
    rec = wake.record
    if step.status == "new":
        step.status, step.event_type, step.wake_at = (
            "waiting",
            CHILD_EVENT + id,
            stepkinds.deadline(wake, m, now),
        )
        entry = wake._history("waiting", step, message=f"for instance {id} to end",
                              data_json=json.dumps({"child": id, "timeout_at": step.wake_at}))  # fmt: skip
        wake._submit(wake._change(steps=[dataclasses.replace(step)], history=[entry]))
    child = await asyncio.to_thread(wake.engine.storage.get_instance, rec.tenant, id)
    problem = _outcome(child, id, rec.id)
    ended = problem is not None or (child is not None and child.status in TERMINAL)
    assert step.wake_at is not None
    stale: list[tuple[int, str]] = []
    if not ended and step.wake_at > now:
        # A notice of a child not ended is stale (its end was refused, or the child was restarted):
        # left unconsumed it would wake the suspended parent again and again. A child's end commits
        # with its notice, so if the child is still not ended after the notice was read, it is stale.
        events = await asyncio.to_thread(
            wake.engine.storage.get_events, rec.tenant, rec.id, unconsumed_only=True, type=step.event_type
        )
        stale = _claim(wake, events, step.event_type, step.key)
        if stale:
            child = await asyncio.to_thread(wake.engine.storage.get_instance, rec.tenant, id)
            problem = _outcome(child, id, rec.id)
            ended = problem is not None or (child is not None and child.status in TERMINAL)
    if not ended and step.wake_at > now:
        if stale:
            wake._submit(wake._change(consume_events=stale))
        wake.wakes.append(step.wake_at)
        wake.wait_types.add(step.event_type)
        wake.hibernating = True
        return {"do": "suspend"}
    if not ended:
        problem = "InstanceTimeout", f"instance {id!r} did not end before the time-out"
    events = await asyncio.to_thread(
        wake.engine.storage.get_events, rec.tenant, rec.id, unconsumed_only=True, type=step.event_type
    )
    consumed = [*stale, *_claim(wake, events, step.event_type, step.key)]  # stale: claimed above
    step.updated_at = now
    if problem is None:
        assert child is not None
        step.status, step.output_json = "complete", child.output_json or "null"
        entry = wake._history("step_completed", step, message=f"instance {id} completed")
        await wake._commit(wake._change(steps=[step], consume_events=consumed, history=[entry]))
        return {"do": "return", "value": json.loads(step.output_json)}
    step.status, (step.error_name, step.error_message) = "failed", problem
    entry = wake._history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
    await wake._commit(wake._change(steps=[step], consume_events=consumed, history=[entry]))
    return {
        "do": "raise",
        "error": {"name": step.error_name, "message": step.error_message, "type": step.event_type},
    }


KINDS: dict[str, Callable[[WakeUp, StepRecord, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "create": create,
    "wait_instance": wait,
}
