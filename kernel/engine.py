"""The step contract, kernel side: runs one wake-up of an instance in its sandbox.

A wake-up replays ``run(event, step)`` against the journal. For every step not settled yet the
guest asks what to do; this module decides (run an attempt, return a recorded value, raise, or
suspend the branch), commits the decision, and only then answers. Step time-outs are enforced
here by stopping the sandbox. Nothing the guest says is trusted: every message is validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from tenantflow.kernel import children, metrics, rollback
from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import Conflict, TenantflowError, Unavailable
from tenantflow.kernel.logbudget import LogBudget, TenantLogRate
from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.engine")
_KEY = re.compile(r"^(?P<name>.{1,256})#(?P<occ>\d{1,6})$", re.S)
_BACKOFFS = ("constant", "linear", "exponential")
MAX_DELAY = 365 * 86400.0
CODE_RETRY_SECONDS = 30.0  # when a loader is unavailable (a git remote down), wake again this much later
WALL_GRACE_SECONDS = 5.0  # after a step that outlasted the wake-up's wall-clock limit
MIB = 1024 * 1024
FLUSH_DELAY = 0.02  # how long a step-started or log line may wait for a commit to ride along with


class _Abort(Exception):
    """Stop this wake-up now (protocol violation, lost lease, terminated)."""


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def retry_delay(policy: dict[str, Any], attempt: int) -> float:
    """Delay after failed attempt number ``attempt`` (1-based)."""
    delay = float(policy["delay"])
    if policy["backoff"] == "linear":
        delay *= attempt
    elif policy["backoff"] == "exponential":
        delay *= 2 ** min(attempt - 1, 60)
    return min(delay, MAX_DELAY)


def _policy(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("policy must be an object")
    limit, delay, backoff, timeout = (
        raw.get("limit"),
        raw.get("delay"),
        raw.get("backoff"),
        raw.get("timeout"),
    )
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 10_000:
        raise ValueError(f"retry limit must be an integer in 0..10000, got {limit!r}")
    if not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY or math.isnan(delay):
        raise ValueError(f"retry delay must be 0..365 days, got {delay!r}")
    if backoff not in _BACKOFFS:
        raise ValueError(f"backoff must be one of {_BACKOFFS}, got {backoff!r}")
    if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_DELAY or math.isnan(timeout):
        raise ValueError(f"timeout must be > 0 and at most 365 days, got {timeout!r}")
    return {"limit": limit, "delay": float(delay), "backoff": backoff, "timeout": float(timeout)}


def _text(raw: Any, limit: int) -> str:
    """Guest text made storable: lone surrogates (from ``\\ud800`` escapes) become escapes again
    instead of failing the commit they ride in."""
    return str(raw)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _valid_text(raw: Any, what: str) -> str:
    """Guest text that must round-trip exactly (step names and keys, event types)."""
    text = str(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {text!r} is not valid Unicode text (a lone surrogate?)") from None
    return text


def _strict_json(value: Any) -> str | None:
    """``value`` as RFC 8259 JSON, or None if it holds NaN or Infinity (no other language reads them)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return None


def _not_json(what: str) -> dict[str, str]:
    return {"name": "NotJson", "message": (
        f"{what} a value with NaN or Infinity, which is not JSON (RFC 8259) and clients in other "
        "languages cannot read: return null or a string instead")}  # fmt: skip


def _error(raw: Any, limit: int = 4096) -> dict[str, str]:
    raw = raw if isinstance(raw, dict) else {}
    return {"name": _text(raw.get("name") or "Error", 200), "message": _text(raw.get("message") or "", limit)}


def _foldable(change: Change, into: Change | None = None) -> bool:
    """Whether ``change`` guards nothing but generation and lease (as ``into``'s), and, when
    ``into`` is given, only adds steps and history: folded into ``into`` it commits exactly when it
    would have committed on its own in the same transaction."""
    if change.expect_status or change.consume_events or change.add_events or change.bump_generation:
        return False
    if change.delete_steps_from is not None:
        return False
    if into is None:
        return True
    return (not change.set and not change.wake_on_events and not change.pause_aware
            and (change.generation, change.owner) == (into.generation, into.owner))  # fmt: skip


@dataclasses.dataclass
class _Flight:
    attempt: int
    deadline: float
    policy: dict[str, Any]
    timeout: float  # the policy's, or the kernel's ceiling if that is lower
    started: float


def _timed_out(flight: _Flight, now: float, hard: float) -> dict[str, str]:
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


class WakeUp:
    """One wake-up of one instance; also the :class:`~tenantflow.kernel.sandbox.Host` for its guest."""

    def __init__(self, engine: Engine, record: InstanceRecord) -> None:
        self.engine = engine
        self.record = record
        self.steps: dict[str, StepRecord] = {}
        self.flights: dict[str, _Flight] = {}
        self.wakes: list[float] = []
        self.wait_types: set[str] = set()
        self.hibernating = False  # some branch sleeps or waits for an event
        self.next_seq = 1
        self.ended = False
        self.pause_requested = False
        self.aborted = ""  # stopped from outside (terminated, restarted, lease lost): write nothing more
        self.stopped = ""  # stopped by this wake-up itself (time-outs): record why
        config = engine.config
        self.logs = LogBudget(record.tenant, engine.log_rate, config.max_log_lines_per_run,
                              config.max_log_bytes_per_run, config.log_flood_factor, self._flooded)  # fmt: skip
        self._loop = asyncio.get_running_loop()
        self.sandbox_task: asyncio.Task[Any] | None = None
        self.wall = math.inf  # when this wake-up's wall-clock limit strikes (set once it runs)
        self.hard_limit = 0.0  # seconds no wake-up outlives, whatever its steps' time-outs (set once it runs)
        self.state_bytes = 0  # bytes of step outputs stored for the instance (journal + this wake-up)
        self._pending: list[Change] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    # -- commits ----------------------------------------------------------------------------------
    def _change(self, **kwargs: Any) -> Change:
        return Change(
            tenant=self.record.tenant, id=self.record.id, generation=self.record.generation,
            owner=self.engine.config.node_id, now=time.time(), **kwargs,
        )  # fmt: skip

    def _submit(self, change: Change) -> None:
        """Record a change nobody waits for (a step started, a log line). It is committed with the
        next awaited change, or within ``FLUSH_DELAY`` — so a fast step costs one commit, not two."""
        self._pending.append(change)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        for change in pending:
            future = self.engine.committer.submit(change)
            future.add_done_callback(self._check_async_commit)

    def _with_pending(self, change: Change) -> Change:
        """``change`` (about to be awaited) with the pending changes folded in when its guards are
        theirs, so they cost no statements of their own and commit exactly as they would have in its
        transaction; otherwise they are queued just before it."""
        pending = self._pending
        if pending and _foldable(change) and all(_foldable(p, change) for p in pending):
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            self._pending = []
            steps = {s.key: s for p in (*pending, change) for s in p.steps}  # a step's latest record wins
            history = [h for p in pending for h in p.history]
            return dataclasses.replace(
                change, steps=list(steps.values()), history=[*history, *change.history]
            )
        self._flush()
        return change

    def _check_async_commit(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None or not future.result().ok:
            self.abort(str(exc) if exc else future.result().reason)

    async def _commit(self, change: Change) -> None:
        if self.ended and (dropped := self.logs.summary()):  # the wake-up's last commit says it once
            entry = self._history("log", message=dropped, data_json=json.dumps({
                "stream": "stderr", "dropped_lines": self.logs.dropped_lines, "dropped_bytes": self.logs.dropped_bytes}))  # fmt: skip
            change = dataclasses.replace(change, history=[*change.history, entry])
        change = self._with_pending(change)  # one transaction: a fast step costs one commit
        try:
            result = await self.engine.committer.commit(change)
        except Conflict as exc:
            self.aborted = self.aborted or str(exc)
            raise _Abort(str(exc)) from None
        except Exception as exc:  # storage failed (disk full, locked): nothing was written
            log.error("commit for %s/%s failed (%s); the wake-up stops and replays after its lease",
                      self.record.tenant, self.record.id, exc)  # fmt: skip
            self.abort(f"storage failed: {exc}")
            raise _Abort(str(exc)) from None
        # Pause and Resume reach a wake-up running on another node through storage: it learns of
        # them at its next commit.
        if result.status == Status.WAITING_FOR_PAUSE:
            self.pause_requested = True
        elif result.status == Status.RUNNING:
            self.pause_requested = False

    def abort(self, reason: str) -> None:
        """Stop the sandbox; nothing more is written for this wake-up."""
        if not self.aborted:
            self.aborted = reason
        self._pending.clear()
        self._cancel_sandbox()

    def _cancel_sandbox(self) -> None:
        if self.sandbox_task is not None and not self.sandbox_task.done():
            self.sandbox_task.cancel()

    def _history(self, kind: str, step: StepRecord | None = None, **kwargs: Any) -> HistoryEntry:
        return HistoryEntry(kind=kind, at=time.time(), step=step.name if step else "", **kwargs)

    def _status(self, status: Status, message: str = "") -> HistoryEntry:
        return HistoryEntry(kind="status", at=time.time(), status=int(status), message=message)

    # -- the wake-up ------------------------------------------------------------------------------
    async def execute(self) -> None:
        rec = self.record
        engine = self.engine
        try:
            code = await engine.catalog.get(rec.tenant, rec.code)
            sandbox = engine.catalog.sandbox(code.bundle.runtime)
        except Unavailable as exc:  # e.g. a git remote is unreachable: try again later, keep the instance
            log.warning("cannot load %s for %s/%s (%s); retrying in %g s", rec.code, rec.tenant, rec.id, exc,
                        CODE_RETRY_SECONDS)  # fmt: skip
            metrics.outcome(self, "code_unavailable")
            self.ended = True
            retry = self._change(
                set={"run_at": time.time() + CODE_RETRY_SECONDS, "lease_owner": None, "lease_until": None}
            )
            with contextlib.suppress(_Abort):
                await self._commit(retry)
            return
        except TenantflowError as exc:
            await self._end_errored({"name": "CodeUnavailable", "message": f"cannot load {rec.code}: {exc}"})
            return
        self.steps = {s.key: s for s in await asyncio.to_thread(engine.storage.get_steps, rec.tenant, rec.id)}
        self.next_seq = max((s.seq for s in self.steps.values()), default=0) + 1
        self.state_bytes = sum(len(s.output_json or "") for s in self.steps.values())
        result = await engine.committer.submit(self._change(
            set={"status": Status.RUNNING},
            expect_status=frozenset({Status.QUEUED, Status.RUNNING, Status.WAITING}),
            history=[self._status(Status.RUNNING)] if rec.status != Status.RUNNING else [],
        ))  # fmt: skip
        if not result.ok and result.status == Status.WAITING_FOR_PAUSE:
            # Pause asked for before this wake-up started: keep that status, run to a step boundary.
            self.pause_requested = True
            result = await engine.committer.submit(
                self._change(expect_status=frozenset({Status.WAITING_FOR_PAUSE}))
            )
        if not result.ok:
            if result.status == Status.PAUSED:  # paused between claim and start
                await engine.committer.submit(self._change(set={"lease_owner": None, "lease_until": None}))
            return
        module = code.bundle.entry or code.workflows.get(rec.workflow)
        if module is None:
            await self._end_errored(
                {
                    "name": "WorkflowNotFound",
                    "message": f"{rec.code} defines no workflow class {rec.workflow!r}",
                }
            )
            return
        job = {
            "files": code.bundle.files,  # bytes: each sandbox encodes them for its guest
            "module": module,
            "workflow": rec.workflow,
            "event": {"payload": json.loads(rec.params_json or "null"), "instance_id": rec.id,
                      "timestamp": iso(rec.created_at)},
            "journal": [self._journal_entry(s) for s in sorted(self.steps.values(), key=lambda s: s.seq)],
        }  # fmt: skip
        rollback.prepare(self, job)
        self.sandbox_task = asyncio.create_task(sandbox.run(job, self, engine.config.limits))
        metrics.sandbox_started(self, code.bundle.runtime)
        timed_out = await self._watch_deadlines()
        try:
            exit_ = await self.sandbox_task
            detail = exit_.detail
        except (asyncio.CancelledError, _Abort):
            detail = self.stopped or "stopped"
        except Exception as exc:  # a broken sandbox must not take the kernel down
            log.exception("sandbox failed for %s/%s", rec.tenant, rec.id)
            detail = f"the sandbox failed: {exc}"
        metrics.sandbox_ended(self, code.bundle.runtime, detail)
        if self.ended or self.aborted:
            return
        await self._crashed(detail, timed_out)

    async def _watch_deadlines(self) -> list[str]:
        """Wait for the sandbox; stop it when a step attempt outlives its time-out."""
        assert self.sandbox_task is not None
        config = self.engine.config
        started = time.time()
        self.wall = started + config.limits.wall_seconds
        # Steps started late may not chain past this: no tenant holds a slot longer, whatever it asks.
        self.hard_limit = max(config.limits.wall_seconds, config.step_timeout_ceiling) + WALL_GRACE_SECONDS
        hard = started + self.hard_limit
        while not self.sandbox_task.done():
            now = time.time()
            flights = [f.deadline for f in self.flights.values()]
            # A step's own time-out (at most the ceiling) may outlast the wake-up limit: the wake-up waits for it.
            deadline = min([*flights, max([self.wall, *flights]), hard])
            if now >= deadline:
                late = [k for k, f in self.flights.items() if f.deadline <= now or now >= hard]
                limit = config.limits.wall_seconds
                self.stopped = (
                    "step time-out"
                    if late
                    else f"the wake-up ran longer than its {limit:g} s wall-clock limit"
                )
                self._cancel_sandbox()
                with contextlib.suppress(BaseException):
                    await self.sandbox_task
                return late
            await asyncio.wait({self.sandbox_task}, timeout=min(deadline - now, 1.0))
        return []

    def _journal_entry(self, step: StepRecord) -> dict[str, Any]:
        entry: dict[str, Any] = {"key": step.key, "name": step.name, "kind": step.kind, "status": step.status}
        if step.status == "complete" and step.output_json:
            entry["value"] = json.loads(step.output_json)
        if step.status == "failed":
            entry["error"] = {"name": step.error_name, "message": step.error_message, "type": step.event_type}
        return entry

    async def _end_errored(self, error: dict[str, str]) -> None:
        metrics.outcome(self, "errored")
        self.ended = True
        children.notify_parent(self, Status.ERRORED)
        change = self._change(
            set={"status": Status.ERRORED, "error_name": error["name"], "error_message": error["message"],
                 "run_at": None, "lease_owner": None, "lease_until": None},
            history=[self._status(Status.ERRORED, f"{error['name']}: {error['message']}")],
        )  # fmt: skip
        with contextlib.suppress(_Abort):
            await self._commit(change)

    async def _crashed(self, detail: str, timed_out: list[str]) -> None:
        """The guest died or was stopped: charge the attempts in flight, then come back later."""
        now = time.time()
        steps: list[StepRecord] = []
        history: list[HistoryEntry] = []
        charged = timed_out or list(self.flights)
        metrics.outcome(self, "timed_out" if timed_out or self.stopped else "crashed")
        if not charged:
            await self._end_errored(
                {"name": "SandboxCrash", "message": f"the workflow crashed outside a step: {detail}"}
            )
            return
        for key in charged:
            flight = self.flights.pop(key)
            step = self.steps[key]
            if key in timed_out:
                error = _timed_out(flight, now, self.hard_limit)
            else:
                error = {"name": "SandboxCrash", "message": detail}  # fmt: skip
            history.extend(self._fail_attempt(step, flight.policy, error, retryable=True))
            steps.append(step)
        change = self._change(
            steps=steps, history=history,
            set={"status": Status.RUNNING, "run_at": now, "lease_owner": None, "lease_until": None},
            pause_aware=True,
        )  # fmt: skip
        self.ended = True
        with contextlib.suppress(_Abort):
            await self._commit(change)

    # -- the host protocol ------------------------------------------------------------------------
    def admit(self, size: int) -> bool:
        return not self.aborted and self.logs.admit(size)

    async def notify(self, message: dict[str, Any]) -> None:
        if message.get("op") != "log" or self.aborted:
            return
        self._submit(self._change(history=[self._history("log", message=_text(message.get("line", ""), 8192),
            data_json=json.dumps({"stream": _text(message.get("stream", "stdout"), 16)}))]))  # fmt: skip

    def _flooded(self, reason: str) -> None:
        """From any thread: stop a guest that keeps flooding its log (its attempts fail as a crash)."""

        def stop() -> None:
            self.stopped = self.stopped or reason
            self._cancel_sandbox()

        self._loop.call_soon_threadsafe(stop)

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.aborted:
            raise _Abort(self.aborted)
        op = message.get("op")
        try:
            if op == "step":
                return await self._step(message)
            if op == "result":
                return await self._result(message)
            if op == "finish":
                return await self._finish(message)
            if op == "suspend":
                return await self._suspend()
            if op == "rollback":
                return await rollback.begin(self, message)
            if op == "rolled_back":
                return await rollback.end(self, message)
        except (KeyError, TypeError, ValueError) as exc:
            await self._end_errored({"name": "SandboxProtocolError", "message": f"bad {op} message: {exc}"})
            raise _Abort(str(exc)) from None
        await self._end_errored({"name": "SandboxProtocolError", "message": f"unknown operation {op!r}"})
        raise _Abort(f"unknown operation {op!r}")

    def _known(self, message: dict[str, Any]) -> StepRecord:
        key = str(message["key"])
        step = self.steps.get(key)
        if step is None:
            raise ValueError(f"unknown step {key!r}")
        return step

    async def _step(self, m: dict[str, Any]) -> dict[str, Any]:
        if m["kind"] == "undo":  # keyed after its forward step, never a step of its own name
            return await rollback.undo(self, m)
        kind, key, name = m["kind"], _valid_text(m["key"], "step key"), _valid_text(m["name"], "step name")
        match = _KEY.match(key)
        if kind not in ("do", "sleep", "wait", *children.KINDS) or not match or match["name"] != name:
            raise ValueError(f"bad step request {key!r} ({kind!r})")
        step = self.steps.get(key)
        if step is not None and step.kind != kind:
            await self._end_errored({"name": "NonDeterminismError", "message": (
                f"step {name!r} was recorded as {step.kind}, but the workflow now asks for {kind}")})  # fmt: skip
            raise _Abort("non-determinism")
        if step is None:
            if len(self.steps) >= self.engine.config.max_steps:
                await self._end_errored({"name": "StepLimitExceeded", "message": (
                    f"the instance asked for more than {self.engine.config.max_steps} steps; split the work "
                    "into several instances")})  # fmt: skip
                raise _Abort("step limit")
            if self.pause_requested:
                return self._suspend_for_pause()
            step = StepRecord(
                key=key, seq=self.next_seq, name=name, kind=kind, status="new", updated_at=time.time()
            )
            self.next_seq += 1
            self.steps[key] = step
        if kind == "do":
            return await self._do(step, _policy(m["policy"]))
        if kind == "sleep":
            return await self._sleep(step, m)
        if kind in children.KINDS:
            return await children.KINDS[kind](self, step, m)
        return await self._wait(step, m)

    def _settled(self, step: StepRecord) -> dict[str, Any] | None:
        if step.status == "complete":
            return {"do": "return", "value": json.loads(step.output_json or "null")}
        if step.status == "failed":
            error = {"name": step.error_name, "message": step.error_message, "type": step.event_type}
            return {"do": "raise", "error": error}
        return None

    async def _do(self, step: StepRecord, policy: dict[str, Any]) -> dict[str, Any]:
        settled = self._settled(step)
        if settled is not None:
            return settled
        now = time.time()
        if step.status == "retrying" and step.wake_at is not None and step.wake_at > now:
            self.wakes.append(step.wake_at)
            return {"do": "suspend"}
        if self.pause_requested:
            return self._suspend_for_pause()
        return self._start_attempt(step, policy)

    def _suspend_for_pause(self) -> dict[str, Any]:
        """Park a branch at a step boundary. If the pause is cancelled before the wake-up ends, the
        instance must be runnable again at once, so the branch asks to be woken now."""
        self.wakes.append(time.time())
        return {"do": "suspend"}

    def _start_attempt(self, step: StepRecord, policy: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        step.attempts += 1
        step.status, step.wake_at, step.updated_at = "running", None, now
        timeout = min(policy["timeout"], self.engine.config.step_timeout_ceiling)
        self.flights[step.key] = _Flight(step.attempts, now + timeout, policy, timeout, now)
        metrics.attempt_started(self, step)
        entry = self._history("step_started", step, attempt=step.attempts)
        self._submit(self._change(steps=[dataclasses.replace(step)], history=[entry]))
        return {"do": "run", "attempt": step.attempts}

    def _fail_attempt(
        self, step: StepRecord, policy: dict[str, Any], error: dict[str, str], *, retryable: bool
    ) -> list[HistoryEntry]:
        """Record a failed attempt on ``step`` (retrying or failed for good); return its history."""
        now = time.time()
        step.error_name, step.error_message, step.updated_at = error["name"], error["message"], now
        text = f"{error['name']}: {error['message']}"
        metrics.attempt_failed(self, step, error, retry=retryable and step.attempts <= policy["limit"])
        history = [self._history("step_failed", step, attempt=step.attempts, message=text,
                                 data_json=json.dumps({"final": not retryable or step.attempts > policy["limit"]}))]  # fmt: skip
        if not retryable or step.attempts > policy["limit"]:
            step.status, step.wake_at = "failed", None
            return history
        step.status, step.wake_at = "retrying", now + retry_delay(policy, step.attempts)
        history.append(self._history("step_retrying", step, attempt=step.attempts + 1, message=(
            f"attempt {step.attempts + 1} at {iso(step.wake_at)}"), data_json=json.dumps({"wake_at": step.wake_at})))  # fmt: skip
        return history

    async def _result(self, m: dict[str, Any]) -> dict[str, Any]:
        step = self._known(m)
        flight = self.flights.get(step.key)
        if flight is None or m["attempt"] != flight.attempt:
            raise ValueError(f"no attempt {m.get('attempt')!r} of step {step.key!r} is running")
        del self.flights[step.key]
        # A step allowed past the wake-up limit leaves a moment to commit and reach the next boundary.
        self.wall = max(self.wall, time.time() + WALL_GRACE_SECONDS)
        output = _strict_json(m.get("value")) if m["ok"] is True else None
        if output is not None:
            if len(output) > self.engine.config.max_payload_bytes:
                error = {"name": "OutputTooLarge", "message": (
                    f"the step returned {len(output)} bytes of JSON; the limit is "
                    f"{self.engine.config.max_payload_bytes}: store large data elsewhere and return a reference")}  # fmt: skip
            elif state_error := self._state_full(len(output)):
                error = state_error
            else:
                step.status, step.output_json, step.updated_at = "complete", output, time.time()
                step.error_name = step.error_message = ""
                entry = self._history("step_completed", step, attempt=step.attempts)
                self.state_bytes += len(output)  # before the commit: parallel steps count each other
                await self._commit(self._change(steps=[step], history=[entry]))
                metrics.attempt_succeeded(self, step)
                return {"do": "return", "value": m.get("value")}
            retryable = False
        elif m["ok"] is True:
            error, retryable = _not_json("the step returned"), False
        else:
            error = _error(m.get("error"))
            retryable = bool((m.get("error") or {}).get("retryable", True))
            if error["name"] == "MemoryError" and not error["message"]:
                mib = self.engine.config.limits.memory_bytes // (1024 * 1024)
                error["message"] = f"out of memory: the step exceeded the sandbox memory limit ({mib} MiB)"
        history = self._fail_attempt(step, flight.policy, error, retryable=retryable)
        await self._commit(self._change(steps=[step], history=history))
        if step.status == "failed":
            return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message}}
        assert step.wake_at is not None
        if step.wake_at <= time.time() and not self.pause_requested:
            return self._start_attempt(step, flight.policy)
        self.wakes.append(step.wake_at)
        return self._suspend_for_pause() if self.pause_requested else {"do": "suspend"}

    def _state_full(self, adding: int) -> dict[str, str] | None:
        """The InstanceStateLimit error if storing ``adding`` more bytes of output passes the cap."""
        cap = self.engine.config.max_instance_state_bytes
        if self.state_bytes + adding <= cap:
            return None
        return {"name": "InstanceStateLimit", "message": (
            f"this instance has stored {self.state_bytes / MIB:.1f} MiB of step outputs and this one adds "
            f"{adding / MIB:.1f} MiB; the limit is {cap / MIB:g} MiB per instance (the kernel's "
            "--max-instance-state-mb): store large data elsewhere and return a reference, or split the work "
            "into several instances")}  # fmt: skip

    def _deadline(self, m: dict[str, Any], now: float) -> float:
        limit = self.engine.config.max_sleep_seconds
        if "until" in m:
            until = float(m["until"])
            if math.isnan(until) or until > now + limit:
                raise ValueError(f"cannot sleep past {limit:g} s from now")
            return until
        seconds = float(m["seconds"])
        if math.isnan(seconds) or not 0 <= seconds <= limit:
            raise ValueError(f"durations must be between 0 and {limit:g} s")
        return now + seconds

    async def _sleep(self, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
        if step.status == "complete":
            return {"do": "return", "value": None}
        now = time.time()
        if step.status == "new":
            step.status, step.wake_at = "sleeping", self._deadline(m, now)
            if step.wake_at > now:
                entry = self._history("sleeping", step, message=f"until {iso(step.wake_at)}",
                                      data_json=json.dumps({"wake_at": step.wake_at}))  # fmt: skip
                self._submit(self._change(steps=[dataclasses.replace(step)], history=[entry]))
        assert step.wake_at is not None
        if step.wake_at <= now:
            step.status, step.updated_at = "complete", now
            self._submit(
                self._change(
                    steps=[dataclasses.replace(step)], history=[self._history("step_completed", step)]
                )
            )
            return {"do": "return", "value": None}
        self.wakes.append(step.wake_at)
        self.hibernating = True
        return {"do": "suspend"}

    async def _wait(self, step: StepRecord, m: dict[str, Any]) -> dict[str, Any]:
        settled = self._settled(step)
        if settled is not None:
            return settled
        event_type = m["type"]
        if not isinstance(event_type, str) or not 0 < len(event_type) <= 256:
            raise ValueError("an event type must be a non-empty string of at most 256 characters")
        _valid_text(event_type, "event type")
        if event_type.startswith(children.RESERVED_EVENT_PREFIX):
            raise ValueError(
                f"event types starting with {children.RESERVED_EVENT_PREFIX!r} are the kernel's own"
            )
        now = time.time()
        if step.status == "new":
            step.status, step.event_type, step.wake_at = "waiting", event_type, self._deadline(m, now)
            entry = self._history("waiting", step, message=f"for an event of type {event_type!r}",
                                  data_json=json.dumps({"type": event_type, "timeout_at": step.wake_at}))  # fmt: skip
            self._submit(self._change(steps=[dataclasses.replace(step)], history=[entry]))
        rec = self.record
        events = await asyncio.to_thread(
            self.engine.storage.get_events, rec.tenant, rec.id, unconsumed_only=True
        )
        event = next((e for e in events if e.type == step.event_type), None)
        if event is not None:
            value = {
                "type": event.type,
                "payload": json.loads(event.payload_json or "null"),
                "timestamp": iso(event.created_at),
            }
            output = json.dumps(value)
            if full := self._state_full(len(output)):  # the event stays in the inbox
                step.status, step.updated_at = "failed", now
                step.error_name, step.error_message = full["name"], full["message"]
                entry = self._history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
                await self._commit(self._change(steps=[step], history=[entry]))
                return {"do": "raise", "error": {**full, "type": step.event_type}}
            step.status, step.output_json, step.updated_at = "complete", output, now
            entry = self._history("step_completed", step, message=f"event {event.seq} received")
            self.state_bytes += len(output)
            await self._commit(
                self._change(steps=[step], consume_events=[(event.seq, step.key)], history=[entry])
            )
            return {"do": "return", "value": value}
        assert step.wake_at is not None
        if step.wake_at <= now:
            step.status, step.updated_at = "failed", now
            step.error_name = "EventTimeoutError"
            step.error_message = f"no event of type {step.event_type!r} arrived before the time-out"
            entry = self._history("step_failed", step, message=f"{step.error_name}: {step.error_message}")
            await self._commit(self._change(steps=[step], history=[entry]))
            return {"do": "raise", "error": {"name": step.error_name, "message": step.error_message,
                                             "type": step.event_type}}  # fmt: skip
        self.wakes.append(step.wake_at)
        self.wait_types.add(step.event_type)
        self.hibernating = True
        return {"do": "suspend"}

    async def _finish(self, m: dict[str, Any]) -> dict[str, Any]:
        if m["ok"] is True:
            output = _strict_json(m.get("value"))
            if output is None:
                await self._end_errored(_not_json("run() returned"))
                return {"do": "ack"}
            if len(output) > self.engine.config.max_payload_bytes:
                await self._end_errored({"name": "OutputTooLarge", "message": (
                    f"run() returned {len(output)} bytes of JSON; the limit is {self.engine.config.max_payload_bytes}")})  # fmt: skip
                return {"do": "ack"}
            self.ended = True
            metrics.outcome(self, "complete")
            children.notify_parent(self, Status.COMPLETE)
            change = self._change(
                set={"status": Status.COMPLETE, "output_json": output, "error_name": "", "error_message": "",
                     "run_at": None, "lease_owner": None, "lease_until": None},
                history=[self._status(Status.COMPLETE)],
            )  # fmt: skip
            await self._commit(change)
        else:
            await self._end_errored(_error(m.get("error"), 16384))
        return {"do": "ack"}

    async def _suspend(self) -> dict[str, Any]:
        # A pause asked for while running is stored as WAITING_FOR_PAUSE, and pause_aware turns that
        # into PAUSED in the same transaction; a Resume that landed meanwhile (on any node) has
        # already cleared it, so the instance goes on instead of being paused by a stale flag.
        status = Status.WAITING if self.hibernating else Status.RUNNING
        run_at = min(self.wakes) if self.wakes else None
        history = [self._status(status)] if status != Status.RUNNING else []
        outcome = "suspended" if status == Status.RUNNING else status.name.lower()
        metrics.outcome(self, "paused" if self.pause_requested else outcome)
        change = self._change(
            set={"status": status, "run_at": run_at, "lease_owner": None, "lease_until": None},
            wake_on_events=sorted(self.wait_types), pause_aware=True, history=history,
        )  # fmt: skip
        self.ended = True
        await self._commit(change)
        return {"do": "ack"}


class Engine:
    """Runs wake-ups; tracks which are active in this process so control RPCs can reach them."""

    def __init__(
        self,
        storage: Storage,
        committer: Committer,
        catalog: CodeCatalog,
        config: KernelConfig,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.storage = storage
        self.committer = committer
        self.catalog = catalog
        self.config = config
        self.active: dict[tuple[str, str], WakeUp] = {}
        self._on_idle = on_idle
        self.log_rate = TenantLogRate(config.tenant_log_lines_per_second, config.tenant_log_bytes_per_second)
        self.spawn: children.Spawn | None = None  # step.create's way to the kernel's create (set by it)

    async def execute(self, record: InstanceRecord) -> None:
        key = (record.tenant, record.id)
        wake = WakeUp(self, record)
        self.active[key] = wake
        try:
            with metrics.wakeup(wake):
                await wake.execute()
        except _Abort:
            pass
        except Exception:
            log.exception("wake-up of %s/%s failed", record.tenant, record.id)
        finally:
            if self.active.get(key) is wake:
                del self.active[key]
            self._on_idle()

    def kill(self, tenant: str, id: str, reason: str) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.abort(reason)

    def request_pause(self, tenant: str, id: str, pause: bool = True) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.pause_requested = pause
