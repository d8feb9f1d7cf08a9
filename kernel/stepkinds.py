"""The step decisions: what the kernel answers for ``do``, ``sleep`` and ``wait`` steps, a step's
result, ``finish`` and ``suspend``.

Each function decides for one guest request against a :class:`~tenantflow.kernel.journal.Journal`
and commits the decision through it before answering; it may read the instance's inbox through the
journal, but never runs or stops a sandbox (that is the wake-up's, in :mod:`tenantflow.kernel.wakeup`).
The child and rollback step kinds live in :mod:`~tenantflow.kernel.children` and
:mod:`~tenantflow.kernel.rollback`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from tenantflow.kernel import metrics, stepreach
from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.guestdata import _error, _not_json, _strict_json, _valid_text, iso, retry_delay
from tenantflow.kernel.journal import RESERVED_EVENT_PREFIX, Flight, Journal
from tenantflow.kernel.model import HistoryEntry, Status, StepRecord
from tenantflow.kernel.tenantkv import KVConflictError, KVWrite

MAX_KV_CONFLICTS = 10  # runs of an attempt in a row refused by a KV conflict, then it fails (retryable)
WALL_GRACE_SECONDS = 5.0  # after a step that outlasted the wake-up's wall-clock limit
MIB = 1024 * 1024


def timed_out(flight: Flight, now: float, hard: float) -> dict[str, str]:
    """The StepTimeout error of an attempt stopped at ``now``."""
    asked = flight.policy["timeout"]
    if flight.deadline > now:  # stopped by the wake-up's hard limit before its own time-out
        return {"name": "StepTimeout", "message": (
            f"attempt {flight.attempt} was stopped after {now - flight.started:.0f} s: the wake-up reached "
            f"its hard limit of {hard:g} s (the larger of the kernel's --wall-seconds and --max-step-timeout, "
            f"plus {WALL_GRACE_SECONDS:g} s to commit); split long work into shorter steps")}  # fmt: skip
    if flight.timeout < asked:
        return {"name": "StepTimeout", "message": (
            f"attempt {flight.attempt} did not finish within {flight.timeout:.10g} s: the step asked for "
            f"{asked:.10g} s, capped to {flight.timeout:.10g} s by the kernel's --max-step-timeout")}  # fmt: skip
    return {
        "name": "StepTimeout",
        "message": f"attempt {flight.attempt} did not finish within {asked:.10g} s",
    }


def settled(journal: Journal, step: StepRecord) -> dict[str, Any] | None:
    if step.status == "complete":
        return {"do": "return", "value": json.loads(step.output_json or "null")}
    if step.status == "failed":
        error = {"name": step.error_name, "message": step.error_message, "type": step.event_type}
        return {"do": "raise", "error": error}
    return None


def not_now(journal: Journal, step: StepRecord) -> dict[str, Any] | None:
    """The answer for a step that must not start an attempt now: settled (replay it), backing off
    before a retry, or parked for a pause. None when an attempt may start."""
    answer = settled(journal, step)
    if answer is not None:
        return answer
    if step.status == "retrying" and step.wake_at is not None and step.wake_at > journal.now():
        journal.wakes.append(step.wake_at)
        return {"do": "suspend"}
    if journal.pause_requested:
        return suspend_for_pause(journal)
    return None


async def do(journal: Journal, step: StepRecord, policy: dict[str, Any]) -> dict[str, Any]:
    return not_now(journal, step) or start_attempt(journal, step, policy)


def suspend_for_pause(journal: Journal) -> dict[str, Any]:
    """Park a branch at a step boundary. If the pause is cancelled before the wake-up ends, the
    instance must be runnable again at once, so the branch asks to be woken now."""
    journal.wakes.append(journal.now())
    return {"do": "suspend"}


def start_attempt(journal: Journal, step: StepRecord, policy: dict[str, Any]) -> dict[str, Any]:
    now = journal.now()
    step.attempts += 1
    step.status, step.wake_at, step.updated_at = "running", None, now
    timeout = min(policy["timeout"], journal.config.step_timeout_ceiling)
    journal.flights[step.key] = Flight(step.attempts, now + timeout, policy, timeout, now)
    metrics.attempt_started(journal, step)
    entry = journal.history("step_started", step, attempt=step.attempts)
    journal.submit(journal.change(steps=[dataclasses.replace(step)], history=[entry]))
    return {"do": "run", "attempt": step.attempts}


def fail_attempt(
    journal: Journal, step: StepRecord, policy: dict[str, Any], error: dict[str, str], *, retryable: bool
) -> list[HistoryEntry]:
    """Record a failed attempt on ``step`` (retrying or failed for good); return its history."""
    now = journal.now()
    step.error_name, step.error_message, step.updated_at = error["name"], error["message"], now
    step.error_traceback = error.get("traceback", "")
    text = f"{error['name']}: {error['message']}"
    metrics.attempt_failed(journal, step, error, retry=retryable and step.attempts <= policy["limit"])
    data: dict[str, Any] = {"final": not retryable or step.attempts > policy["limit"]}
    if step.error_traceback:
        data["traceback"] = step.error_traceback
    history = [journal.history("step_failed", step, attempt=step.attempts, message=text,
                               data_json=json.dumps(data))]  # fmt: skip
    if not retryable or step.attempts > policy["limit"]:
        step.status, step.wake_at = "failed", None
        return history
    step.status, step.wake_at = "retrying", now + retry_delay(policy, step.attempts)
    history.append(journal.history("step_retrying", step, attempt=step.attempts + 1, message=(
        f"attempt {step.attempts + 1} at {iso(step.wake_at)}"), data_json=json.dumps({"wake_at": step.wake_at})))  # fmt: skip
    return history


async def result(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    step = journal.known(str(m["key"]))
    flight = journal.flights.get(step.key)
    if flight is None or m["attempt"] != flight.attempt:
        raise ValueError(f"no attempt {m.get('attempt')!r} of step {step.key!r} is running")
    del journal.flights[step.key]
    output = _strict_json(m.get("value")) if m["ok"] is True else None
    if output is not None:
        if len(output) > journal.config.max_payload_bytes:
            error = {"name": "OutputTooLarge", "message": (
                f"the step returned {len(output)} bytes of JSON; the limit is "
                f"{journal.config.max_payload_bytes}: store large data elsewhere and return a reference")}  # fmt: skip
        elif state_error := state_full(journal, len(output)):
            error = state_error
        else:
            kv, refused = stepreach.writes(journal, m.get("kv"))
            refused = refused or await _complete(journal, step, output, kv, flight)
            if refused is None:
                metrics.attempt_succeeded(journal, step)
                return {"do": "return", "value": m.get("value")}
            if refused["name"] == "KVConflict":
                metrics.kv_conflict(journal)
            if refused["name"] == "KVConflict" and flight.conflicts + 1 < MAX_KV_CONFLICTS:
                return rerun(journal, step, flight, refused["message"])
            error = refused
            if refused["name"] == "KVConflict":
                error = {"name": "KVConflict", "message": (
                    f"{refused['message']}: attempt {flight.attempt} ran {MAX_KV_CONFLICTS} times in a row and "
                    "each time a key it read changed before it could commit; it retries under the step's "
                    "retry policy (fewer instances writing the same keys at once would conflict less)")}  # fmt: skip
        retryable = error["name"] == "KVConflict"
    elif m["ok"] is True:
        error, retryable = _not_json("the step returned"), False
    else:
        error = _error(m.get("error"))
        retryable = bool((m.get("error") or {}).get("retryable", True))
        if error["name"] == "MemoryError" and not error["message"]:
            mib = journal.config.limits.memory_bytes // (1024 * 1024)
            error["message"] = f"out of memory: the step exceeded the sandbox memory limit ({mib} MiB)"
    history = fail_attempt(journal, step, flight.policy, error, retryable=retryable)
    await journal.commit(journal.change(steps=[step], history=history))
    if step.status == "failed":
        return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message}}
    assert step.wake_at is not None
    if step.wake_at <= journal.now() and not journal.pause_requested:
        return start_attempt(journal, step, flight.policy)
    journal.wakes.append(step.wake_at)
    return suspend_for_pause(journal) if journal.pause_requested else {"do": "suspend"}


async def _complete(
    journal: Journal, step: StepRecord, output: str, kv: list[KVWrite], flight: Flight
) -> dict[str, str] | None:
    """Record ``step`` complete with ``output``, its key-value writes in the same transaction (with
    the attempt's read set, checked there); the KVQuotaExceeded error if the tenant's quota refused
    them, or the KVConflict error if a key the attempt read changed (nothing recorded either way).
    An attempt that writes nothing is not checked: its value stands for the reads it made."""
    reads = flight.kv_reads
    if kv and reads.overflow:
        return {"name": "KVError", "message": f"ctx.kv: {reads.overflow}"}
    done = dataclasses.replace(step, status="complete", output_json=output, updated_at=journal.now(),
                               error_name="", error_message="", error_traceback="")  # fmt: skip
    entry = journal.history("step_completed", done, attempt=done.attempts)
    config = journal.config
    change = journal.change(steps=[done], history=[entry], kv=kv,
                            kv_quota=(config.kv_max_keys, config.kv_max_bytes),
                            kv_reads=list(reads.keys.items()) if kv else [],
                            kv_ranges=reads.ranges if kv else [])  # fmt: skip
    journal.state_bytes += len(output)  # before the commit: parallel steps count each other
    try:
        await journal.commit(change)
    except ResourceExhausted as exc:
        journal.state_bytes -= len(output)
        return {"name": "KVQuotaExceeded", "message": str(exc)}
    except KVConflictError as exc:
        journal.state_bytes -= len(output)
        return {"name": "KVConflict", "message": str(exc)}
    step.status, step.output_json, step.updated_at = done.status, output, done.updated_at
    step.error_name = step.error_message = step.error_traceback = ""
    return None


def rerun(journal: Journal, step: StepRecord, flight: Flight, why: str) -> dict[str, Any]:
    """Run the attempt whose writes a KV conflict refused again, with fresh reads: the same attempt
    (the retry limit does not count it), recorded as a ``kv_conflict`` line of the timeline."""
    now = journal.now()
    journal.flights[step.key] = Flight(flight.attempt, now + flight.timeout, flight.policy, flight.timeout,
                                       now, conflicts=flight.conflicts + 1)  # fmt: skip
    entry = journal.history("kv_conflict", step, attempt=flight.attempt, message=(
        f"{why}: attempt {flight.attempt} runs again ({flight.conflicts + 1} in a row)"),
        data_json=json.dumps({"conflicts": flight.conflicts + 1}))  # fmt: skip
    journal.submit(journal.change(history=[entry]))
    return {"do": "run", "attempt": flight.attempt}


def state_full(journal: Journal, adding: int) -> dict[str, str] | None:
    """The InstanceStateLimit error if storing ``adding`` more bytes of output passes the cap."""
    cap = journal.config.max_instance_state_bytes
    if journal.state_bytes + adding <= cap:
        return None
    return {"name": "InstanceStateLimit", "message": (
        f"this instance has stored {journal.state_bytes / MIB:.1f} MiB of step outputs and this one adds "
        f"{adding / MIB:.1f} MiB; the limit is {cap / MIB:g} MiB per instance (the kernel's "
        "--max-instance-state-mb): store large data elsewhere and return a reference, or split the work "
        "into several instances")}  # fmt: skip


def deadline(journal: Journal, m: dict[str, Any], now: float) -> float:
    limit = journal.config.max_sleep_seconds
    if "until" in m:
        until = float(m["until"])
        if math.isnan(until) or until > now + limit:
            raise ValueError(f"cannot sleep past {limit:g} s from now")
        return until
    seconds = float(m["seconds"])
    if math.isnan(seconds) or not 0 <= seconds <= limit:
        raise ValueError(f"durations must be between 0 and {limit:g} s")
    return now + seconds


async def sleep(journal: Journal, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    if step.status == "complete":
        return {"do": "return", "value": None}
    now = journal.now()
    if step.status == "new":
        step.status, step.wake_at = "sleeping", deadline(journal, m, now)
        if step.wake_at > now:
            entry = journal.history("sleeping", step, message=f"until {iso(step.wake_at)}",
                                  data_json=json.dumps({"wake_at": step.wake_at}))  # fmt: skip
            journal.submit(journal.change(steps=[dataclasses.replace(step)], history=[entry]))
    assert step.wake_at is not None
    if step.wake_at <= now:
        step.status, step.updated_at = "complete", now
        journal.submit(
            journal.change(
                steps=[dataclasses.replace(step)], history=[journal.history("step_completed", step)]
            )
        )
        return {"do": "return", "value": None}
    journal.wakes.append(step.wake_at)
    journal.hibernating = True
    return {"do": "suspend"}


async def wait(journal: Journal, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
    answer = settled(journal, step)
    if answer is not None:
        return answer
    event_type = m["type"]
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 256:
        raise ValueError("an event type must be a non-empty string of at most 256 characters")
    _valid_text(event_type, "event type")
    if event_type.startswith(RESERVED_EVENT_PREFIX):
        raise ValueError(f"event types starting with {RESERVED_EVENT_PREFIX!r} are the kernel's own")
    now = journal.now()
    if step.status == "new":
        step.status, step.event_type, step.wake_at = "waiting", event_type, deadline(journal, m, now)
        entry = journal.history("waiting", step, message=f"for an event of type {event_type!r}",
                              data_json=json.dumps({"type": event_type, "timeout_at": step.wake_at}))  # fmt: skip
        journal.submit(journal.change(steps=[dataclasses.replace(step)], history=[entry]))
    # Only the event this wait consumes is read: the others in the inbox may be many, and large.
    event = await journal.next_event(step.event_type)
    if event is not None:
        value = {
            "type": event.type,
            "payload": json.loads(event.payload_json or "null"),
            "timestamp": iso(event.created_at),
        }
        output = json.dumps(value)
        if full := state_full(journal, len(output)):  # the event stays in the inbox
            step.status, step.updated_at = "failed", now
            step.error_name, step.error_message = full["name"], full["message"]
            entry = journal.history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
            await journal.commit(journal.change(steps=[step], history=[entry]))
            return {"do": "raise", "error": {**full, "type": step.event_type}}
        step.status, step.output_json, step.updated_at = "complete", output, now
        entry = journal.history("step_completed", step, message=f"event {event.seq} received")
        journal.state_bytes += len(output)
        journal.claim(event)
        await journal.commit(
            journal.change(steps=[step], consume_events=[(event.seq, step.key)], history=[entry])
        )
        return {"do": "return", "value": value}
    assert step.wake_at is not None
    if step.wake_at <= now:
        step.status, step.updated_at = "failed", now
        step.error_name = "EventTimeoutError"
        step.error_message = f"no event of type {step.event_type!r} arrived before the time-out"
        entry = journal.history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
        await journal.commit(journal.change(steps=[step], history=[entry]))
        return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message,
                                         "type": step.event_type}}  # fmt: skip
    journal.wakes.append(step.wake_at)
    journal.wait_types.add(step.event_type)
    journal.hibernating = True
    return {"do": "suspend"}


async def finish(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    if m["ok"] is True:
        output = _strict_json(m.get("value"))
        if output is None:
            await journal.end_errored(_not_json("run() returned"))
            return {"do": "ack"}
        if len(output) > journal.config.max_payload_bytes:
            await journal.end_errored({"name": "OutputTooLarge", "message": (
                f"run() returned {len(output)} bytes of JSON; the limit is {journal.config.max_payload_bytes}")})  # fmt: skip
            return {"do": "ack"}
        journal.ended = True
        metrics.outcome(journal, "complete")
        journal.notify_parent(Status.COMPLETE)
        change = journal.change(
            set={"status": Status.COMPLETE, "output_json": output, "error_name": "", "error_message": "",
                 "error_traceback": "", "run_at": None, "lease_owner": None, "lease_until": None},
            history=[journal.status_entry(Status.COMPLETE)],
        )  # fmt: skip
        await journal.commit(change)
    else:
        await journal.end_errored(_error(m.get("error"), 16384))
    return {"do": "ack"}


async def suspend(journal: Journal) -> dict[str, Any]:
    # A pause asked for while running is stored as WAITING_FOR_PAUSE, and pause_aware turns that
    # into PAUSED in the same transaction; a Resume that landed meanwhile (on any node) has
    # already cleared it, so the instance goes on instead of being paused by a stale flag.
    status = Status.WAITING if journal.hibernating else Status.RUNNING
    run_at = min(journal.wakes) if journal.wakes else None
    history = [journal.status_entry(status)] if status != Status.RUNNING else []
    outcome = "suspended" if status == Status.RUNNING else status.name.lower()
    metrics.outcome(journal, "paused" if journal.pause_requested else outcome)
    change = journal.change(
        set={"status": status, "run_at": run_at, "lease_owner": None, "lease_until": None},
        wake_on_events=sorted(journal.wait_types), pause_aware=True, history=history,
    )  # fmt: skip
    journal.ended = True
    await journal.commit(change)
    return {"do": "ack"}
