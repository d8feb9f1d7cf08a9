"""The wake-up: runs one wake-up of an instance in its sandbox.

A wake-up replays ``run(event, step)`` against the instance's journal. For every step not settled
yet the guest asks what to do; :meth:`WakeUp.call` validates the request and hands it to its step
kind (:mod:`~tenantflow.kernel.stepkinds`, :mod:`~tenantflow.kernel.children`,
:mod:`~tenantflow.kernel.rollback`), which decides against the :class:`~tenantflow.kernel.journal.Journal`,
commits through it and only then answers. This module owns the sandbox conversation only: loading
the code, starting the run, step time-outs and the wall-clock limit, crash accounting and the
tenant's log. Nothing the guest says is trusted: every message is validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from tenantflow.kernel import children, egress, metrics, rollback, stepkinds, stepreach, workspace
from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import TenantflowError, Unavailable
from tenantflow.kernel.guestdata import _KEY, _policy, _text, _valid_text, iso
from tenantflow.kernel.journal import Journal, Spawn, Stop
from tenantflow.kernel.logbudget import LogBudget, TenantLogRate
from tenantflow.kernel.model import HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.stepkinds import WALL_GRACE_SECONDS, timed_out
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.engine")
WORKSPACE_RUNTIMES = ("python", "python-wasm")  # the runtimes whose steps may ask for ctx.workspace()
CODE_RETRY_SECONDS = 30.0  # when a loader is unavailable (a git remote down), wake again this much later


class WakeUp:
    """One wake-up of one instance; also the :class:`~tenantflow.kernel.sandbox.Host` for its guest."""

    def __init__(
        self,
        record: InstanceRecord,
        *,
        config: KernelConfig,
        storage: Storage,
        committer: Committer,
        catalog: CodeCatalog,
        log_rate: TenantLogRate,
        spawn: Spawn,
        fresh: bool = False,
        clock: Callable[[], float] = time.time,
        replay: bool = False,
    ) -> None:
        self.record = record
        self.config = config
        self.catalog = catalog
        self.fresh = fresh  # created just now by this node: no steps to read
        # Replaying a history (kernel/replay.py): the guest replays what the journal settles, and the
        # first step it does not settle is neither decided nor run; the wake-up ends there.
        self.replay = replay
        self.replay_stopped_at: tuple[str, str] | None = None  # (step name, kind)
        self.stopped = ""  # stopped by this wake-up itself (time-outs): record why
        self.logs = LogBudget(record.tenant, log_rate, config.max_log_lines_per_run,
                              config.max_log_bytes_per_run, config.log_flood_factor, self._flooded)  # fmt: skip
        self.journal = Journal(record, config, storage, committer, spawn,
                               on_abort=self._cancel_sandbox, last_words=self._dropped_logs, clock=clock)  # fmt: skip
        self._loop = asyncio.get_running_loop()
        self.sandbox_task: asyncio.Task[Any] | None = None
        self.wall = math.inf  # when this wake-up's wall-clock limit strikes (set once it runs)
        self.hard_limit = 0.0  # seconds no wake-up outlives, whatever its steps' time-outs (set once it runs)
        self._egress: egress.RunEgress | None = None  # its connections, once a step opens one
        self._net: egress.HostConnections | None = None  # ... driven through host calls (python-wasm)
        self._files: dict[str, bytes] = {}  # the pinned code's files, for a workspace
        self._runtime = ""

    def abort(self, reason: str) -> None:
        """Stop the sandbox; nothing more is written for this wake-up."""
        self.journal.abort(reason)

    def _cancel_sandbox(self) -> None:
        if self.sandbox_task is not None and not self.sandbox_task.done():
            self.sandbox_task.cancel()

    def _dropped_logs(self) -> list[HistoryEntry]:
        """The line the wake-up's last commit adds when log lines were dropped."""
        dropped = self.logs.summary()
        if not dropped:
            return []
        data = {
            "stream": "stderr",
            "dropped_lines": self.logs.dropped_lines,
            "dropped_bytes": self.logs.dropped_bytes,
        }
        return [self.journal.history("log", message=dropped, data_json=json.dumps(data))]

    # -- the wake-up ------------------------------------------------------------------------------
    async def execute(self) -> None:
        rec, journal = self.record, self.journal
        try:
            code = await self.catalog.get(rec.tenant, rec.code)
            sandbox = self.catalog.sandbox(code.bundle.runtime)
        except Unavailable as exc:  # e.g. a git remote is unreachable: try again later, keep the instance
            log.warning("cannot load %s for %s/%s (%s); retrying in %g s", rec.code, rec.tenant, rec.id, exc,
                        CODE_RETRY_SECONDS)  # fmt: skip
            metrics.outcome(journal, "code_unavailable")
            journal.ended = True
            retry = journal.change(
                set={"run_at": journal.now() + CODE_RETRY_SECONDS, "lease_owner": None, "lease_until": None}
            )
            with contextlib.suppress(Stop):
                await journal.commit(retry)
            return
        except TenantflowError as exc:
            await journal.end_errored(
                {"name": "CodeUnavailable", "message": f"cannot load {rec.code}: {exc}"}
            )
            return
        await journal.load(self.fresh)
        if self.fresh and rec.status == Status.RUNNING:  # created running, leased to this node
            journal.submit(journal.change(history=[journal.status_entry(Status.RUNNING)]))
        elif not await journal.start():
            return
        module = code.bundle.entry or code.workflows.get(rec.workflow)
        if module is None:
            await journal.end_errored(
                {
                    "name": "WorkflowNotFound",
                    "message": f"{rec.code} defines no workflow class {rec.workflow!r}",
                }
            )
            return
        job = {
            "tenant": rec.tenant,  # whose code this is, and which version (a sandbox may keep a
            "code": rec.code,  # warm process for that tenant's next wake-up of the same code)
            "files": code.bundle.files,  # bytes: each sandbox encodes them for its guest
            "module": module,
            "workflow": rec.workflow,
            "event": {"payload": json.loads(rec.params_json or "null"), "instance_id": rec.id,
                      "timestamp": iso(rec.created_at)},
            "journal": journal.guest_journal(),
            "ahead": not journal.pause_requested and not self.replay,  # new steps may run ahead of their grant (see the runtime)
            "kv_limits": {"max_value_bytes": self.config.kv_max_value_bytes,
                          "max_writes": self.config.kv_max_writes_per_step, "max_list": stepreach.MAX_LIST},
        }  # fmt: skip
        rollback.prepare(journal, job)
        self._files, self._runtime = code.bundle.files, code.bundle.runtime
        spaces = workspace.of(self.config.workspace_root, self.config.workspace_quota_bytes)
        if spaces is not None and self._runtime in WORKSPACE_RUNTIMES:  # its run reaches this directory only
            job["workspace"] = await asyncio.to_thread(spaces.prepare, rec.tenant, rec.id)
        self.sandbox_task = asyncio.create_task(sandbox.run(job, self, self.config.limits))
        metrics.sandbox_started(journal, code.bundle.runtime)
        late = await self._watch_deadlines()
        try:
            exit_ = await self.sandbox_task
            detail = exit_.detail
        except (asyncio.CancelledError, Stop):
            detail = self.stopped or "stopped"
        except Exception as exc:  # a broken sandbox must not take the kernel down
            log.exception("sandbox failed for %s/%s", rec.tenant, rec.id)
            detail = f"the sandbox failed: {exc}"
        if journal.ended and not self.stopped:  # it reported its end: how the process went after is no news
            detail = ""
        metrics.sandbox_ended(journal, code.bundle.runtime, detail, self.stopped)
        if self._net is not None:
            self._net.close()
        if self._egress is not None:
            await self._egress.close()
        if spaces is not None and journal.ended and not journal.aborted:
            with contextlib.suppress(Exception):  # the sweep tries again
                if await asyncio.to_thread(workspace.ended, journal.storage, rec.tenant, rec.id):
                    await asyncio.to_thread(spaces.remove, rec.tenant, rec.id)
        if journal.ended or journal.aborted:
            return
        await self._crashed(detail, late)

    async def _watch_deadlines(self) -> list[str]:
        """Wait for the sandbox; stop it when a step attempt outlives its time-out."""
        assert self.sandbox_task is not None
        config = self.config
        started = time.time()
        self.wall = started + config.limits.wall_seconds
        # Steps started late may not chain past this: no tenant holds a slot longer, whatever it asks.
        self.hard_limit = max(config.limits.wall_seconds, config.step_timeout_ceiling) + WALL_GRACE_SECONDS
        hard = started + self.hard_limit
        while not self.sandbox_task.done():
            now = time.time()
            flights = [f.deadline for f in self.journal.flights.values()]
            # A step's own time-out (at most the ceiling) may outlast the wake-up limit: the wake-up waits for it.
            deadline = min([*flights, max([self.wall, *flights]), hard])
            if now >= deadline:
                late = [k for k, f in self.journal.flights.items() if f.deadline <= now or now >= hard]
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

    async def _crashed(self, detail: str, late: list[str]) -> None:
        """The guest died or was stopped: charge the attempts in flight, then come back later."""
        journal = self.journal
        now = journal.now()
        steps: list[StepRecord] = []
        history: list[HistoryEntry] = []
        charged = late or list(journal.flights)
        metrics.outcome(journal, "timed_out" if late or self.stopped else "crashed")
        if not charged:
            await journal.end_errored(
                {"name": "SandboxCrash", "message": f"the workflow crashed outside a step: {detail}"}
            )
            return
        for key in charged:
            flight = journal.flights.pop(key)
            step = journal.steps[key]
            if key in late:
                error = timed_out(flight, now, self.hard_limit)
            else:
                error = {"name": "SandboxCrash", "message": detail}  # fmt: skip
            history.extend(stepkinds.fail_attempt(journal, step, flight.policy, error, retryable=True))
            steps.append(step)
        change = journal.change(
            steps=steps, history=history,
            set={"status": Status.RUNNING, "run_at": now, "lease_owner": None, "lease_until": None},
            pause_aware=True,
        )  # fmt: skip
        journal.ended = True
        with contextlib.suppress(Stop):
            await journal.commit(change)

    # -- the host protocol ------------------------------------------------------------------------
    def admit(self, size: int) -> bool:
        return not self.journal.aborted and self.logs.admit(size)

    async def notify(self, message: dict[str, Any]) -> None:
        journal = self.journal
        if message.get("op") != "log" or journal.aborted:
            return
        line = journal.redact(_text(message.get("line", ""), 8192))  # a secret a step printed
        journal.submit(journal.change(history=[journal.history("log", message=line,
            data_json=json.dumps({"stream": _text(message.get("stream", "stdout"), 16)}))]))  # fmt: skip

    def _flooded(self, reason: str) -> None:
        """From any thread: stop a guest that keeps flooding its log (its attempts fail as a crash)."""

        def stop() -> None:
            self.stopped = self.stopped or reason
            self._cancel_sandbox()

        self._loop.call_soon_threadsafe(stop)

    async def egress_open(self, host: str, port: int) -> socket.socket:
        """A connection the guest asks for, checked against its tenant's allow-list (kernel/egress.py);
        ``egress.Refused`` says why not."""
        if self._egress is None:
            tenant, storage = self.record.tenant, self.journal.storage
            self._egress = egress.RunEgress(tenant, lambda: egress.stored_rules(storage, tenant))
        return await self._egress.open(host, port)

    async def _workspace(self, m: dict[str, Any]) -> dict[str, Any]:
        """``ctx.workspace()``: the path of the instance's workspace (kernel/workspace.py)."""
        flight = self.journal.flights.get(str(m.get("key")))
        if flight is None or m.get("attempt") != flight.attempt:
            raise ValueError(f"ctx.workspace() asked for outside a running step attempt ({m.get('key')!r})")
        spaces = workspace.of(self.config.workspace_root, self.config.workspace_quota_bytes)
        if spaces is None or self._runtime not in WORKSPACE_RUNTIMES:
            return {"error": "this kernel gives steps no workspace: its operator starts it with --workspace-root DIR"
                    if spaces is None else "ctx.workspace() is available in the python and python-wasm runtimes only"}  # fmt: skip
        rec, bundle = self.record, self._files
        whole_tree = getattr(self.catalog.loader(rec.code), "workspace_files", None)

        def files() -> Iterable[workspace.WorkspaceFile]:
            return whole_tree(rec.tenant, rec.code) if whole_tree else workspace.bundle_files(bundle)

        try:
            path = await asyncio.to_thread(spaces.workspace, rec.tenant, rec.id, rec.code, files)
        except workspace.QuotaExceeded as exc:
            return {"error": str(exc)}
        return {"path": workspace.guest_path(path) if self._runtime == "python-wasm" else path}

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        journal = self.journal
        if journal.aborted:
            raise Stop(journal.aborted)
        op = message.get("op")
        if op in ("result", "finish", "rollback", "rolled_back"):  # no secret given to a step goes back out
            message = {k: journal.redact(v) if k in ("value", "error") else v for k, v in message.items()}
        try:
            if op == "kv":
                return await stepreach.kv(journal, message)
            if op == "secret":
                return await stepreach.secret(journal, message)
            if op == "workspace":
                return await self._workspace(message)
            if op == "net":
                self._net = self._net or egress.HostConnections(self.egress_open)
                return await self._net.answer(message)
            if op == "step":
                return await self._step(message)
            if op == "result":
                reply = await stepkinds.result(journal, message)
                # A step allowed past the wake-up limit leaves a moment to commit and reach the next boundary.
                self.wall = max(self.wall, time.time() + WALL_GRACE_SECONDS)
                # A pause waits for the next step boundary: the guest must ask before its next step.
                return {**reply, "ahead": False} if journal.pause_requested else reply
            if op == "finish":
                return await stepkinds.finish(journal, message)
            if op == "suspend":
                return await stepkinds.suspend(journal)
            if op == "rollback":
                return await rollback.begin(journal, message)
            if op == "rolled_back":
                return await rollback.end(journal, message)
        except (KeyError, TypeError, ValueError) as exc:
            await journal.end_errored({"name": "SandboxProtocolError", "message": f"bad {op} message: {exc}"})
            raise Stop(str(exc)) from None
        await journal.end_errored({"name": "SandboxProtocolError", "message": f"unknown operation {op!r}"})
        raise Stop(f"unknown operation {op!r}")

    async def _step(self, m: dict[str, Any]) -> dict[str, Any]:
        journal = self.journal
        if self.replay:  # no decision, no attempt: nothing a replay does reaches the outside
            self.replay_stopped_at = self.replay_stopped_at or (
                _text(m.get("name", ""), 256),
                _text(m.get("kind", ""), 32),
            )
            return {"do": "suspend"}
        if m["kind"] == "undo":  # keyed after its forward step, never a step of its own name
            return await rollback.undo(journal, m)
        kind, key, name = m["kind"], _valid_text(m["key"], "step key"), _valid_text(m["name"], "step name")
        match = _KEY.match(key)
        if kind not in ("do", "sleep", "wait", *children.KINDS) or not match or match["name"] != name:
            raise ValueError(f"bad step request {key!r} ({kind!r})")
        step = journal.steps.get(key)
        # A new do step's first attempt, already running (see the runtime's "running ahead"): the
        # kernel grants it whatever it would have answered, a pending pause included.
        ahead = m.get("ahead") is True
        if ahead and (kind != "do" or step is not None):
            raise ValueError(f"only a new do step may run ahead, not {key!r} ({kind!r})")
        if step is not None and step.kind != kind:
            await journal.end_errored({"name": "NonDeterminismError", "message": (
                f"step {name!r} was recorded as {step.kind}, but the workflow now asks for {kind}")})  # fmt: skip
            raise Stop("non-determinism")
        if step is None:
            if len(journal.steps) >= self.config.max_steps:
                await journal.end_errored({"name": "StepLimitExceeded", "message": (
                    f"the instance asked for more than {self.config.max_steps} steps; split the work "
                    "into several instances")})  # fmt: skip
                raise Stop("step limit")
            if journal.pause_requested and not ahead:
                return stepkinds.suspend_for_pause(journal)
            step = journal.new_step(key, name, kind)
        if kind == "do":
            if ahead:
                return stepkinds.start_attempt(journal, step, _policy(m["policy"]))
            return await stepkinds.do(journal, step, _policy(m["policy"]))
        if kind == "sleep":
            return await stepkinds.sleep(journal, step, m)
        if kind in children.KINDS:
            return await children.KINDS[kind](journal, step, m)
        return await stepkinds.wait(journal, step, m)
