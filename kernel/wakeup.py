"""The wake-up loop: runs one wake-up of an instance in its sandbox, and commits for it.

A wake-up replays ``run(event, step)`` against the journal. For every step not settled yet the
guest asks what to do; :meth:`WakeUp.call` validates the request and hands it to its step kind
(:mod:`~tenantflow.kernel.stepkinds`, :mod:`~tenantflow.kernel.children`,
:mod:`~tenantflow.kernel.rollback`), which decides, commits and only then answers. This module
owns the sandbox (start, step time-outs, wall-clock limit, crash accounting) and the wake-up's
commits (folding, flushing, lease loss); it touches storage only through the committer and reads.
Nothing the guest says is trusted: every message is validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from tenantflow.kernel import children, metrics, rollback, stepkinds
from tenantflow.kernel.errors import Conflict, TenantflowError, Unavailable
from tenantflow.kernel.guestdata import _KEY, _policy, _text, _valid_text, iso
from tenantflow.kernel.logbudget import LogBudget
from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.stepkinds import WALL_GRACE_SECONDS, _Flight, _timed_out

if TYPE_CHECKING:
    from tenantflow.kernel.engine import Engine

log = logging.getLogger("tenantflow.engine")
CODE_RETRY_SECONDS = 30.0  # when a loader is unavailable (a git remote down), wake again this much later
FLUSH_DELAY = 0.02  # how long a step-started or log line may wait for a commit to ride along with


class _Abort(Exception):
    """Stop this wake-up now (protocol violation, lost lease, terminated)."""


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


class WakeUp:
    """One wake-up of one instance; also the :class:`~tenantflow.kernel.sandbox.Host` for its guest."""

    def __init__(self, engine: Engine, record: InstanceRecord, fresh: bool = False) -> None:
        self.engine = engine
        self.record = record
        self.fresh = fresh  # created just now by this node: no steps to read
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
        self.riders: list[
            Change
        ] = []  # committed in the next awaited change's transaction (a parent's notice)
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
        riders, self.riders = self.riders, []
        try:
            result = await self.engine.committer.commit(change, riders)
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
        if not self.fresh:
            self.steps = {
                s.key: s for s in await asyncio.to_thread(engine.storage.get_steps, rec.tenant, rec.id)
            }
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
            "ahead": not self.pause_requested,  # new steps may run ahead of their grant (see the runtime)
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
            history.extend(stepkinds.fail_attempt(self, step, flight.policy, error, retryable=True))
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
                reply = await stepkinds.result(self, message)
                # A pause waits for the next step boundary: the guest must ask before its next step.
                return {**reply, "ahead": False} if self.pause_requested else reply
            if op == "finish":
                return await stepkinds.finish(self, message)
            if op == "suspend":
                return await stepkinds.suspend(self)
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
        # A new do step's first attempt, already running (see the runtime's "running ahead"): the
        # kernel grants it whatever it would have answered, a pending pause included.
        ahead = m.get("ahead") is True
        if ahead and (kind != "do" or step is not None):
            raise ValueError(f"only a new do step may run ahead, not {key!r} ({kind!r})")
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
            if self.pause_requested and not ahead:
                return stepkinds.suspend_for_pause(self)
            step = StepRecord(
                key=key, seq=self.next_seq, name=name, kind=kind, status="new", updated_at=time.time()
            )
            self.next_seq += 1
            self.steps[key] = step
        if kind == "do":
            if ahead:
                return stepkinds.start_attempt(self, step, _policy(m["policy"]))
            return await stepkinds.do(self, step, _policy(m["policy"]))
        if kind == "sleep":
            return await stepkinds.sleep(self, step, m)
        if kind in children.KINDS:
            return await children.KINDS[kind](self, step, m)
        return await stepkinds.wait(self, step, m)
