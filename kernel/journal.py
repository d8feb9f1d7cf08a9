"""One instance's journal while it runs: its recorded steps, the attempts in flight, and the changes
the step decisions commit.

This is the seam between the step kinds and whatever drives them. The step kinds
(:mod:`~tenantflow.kernel.stepkinds`, :mod:`~tenantflow.kernel.children`,
:mod:`~tenantflow.kernel.rollback`) are functions of a :class:`Journal`, a step and the guest's
request; they read and update the journal and commit through it, and know nothing of sandboxes,
deadlines or the API. The kernel's wake-up (:mod:`~tenantflow.kernel.wakeup`) is one driver; a
local run or a replay of an exported history drives the same decisions over its own storage and
clock.

Every change a decision makes is guarded by the instance's generation and this node's lease, and is
committed (:meth:`Journal.commit`) before the decision answers the guest; changes nobody waits for
(a step started, a log line) are submitted (:meth:`Journal.submit`) and ride along with the next
commit, so a fast step costs one transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tenantflow.kernel import metrics
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import Conflict, ResourceExhausted
from tenantflow.kernel.model import (
    TERMINAL,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    Status,
    StepRecord,
)
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.tenantkv import KVConflictError, KVReads

log = logging.getLogger("tenantflow.engine")
FLUSH_DELAY = 0.02  # how long a step-started or log line may wait for a commit to ride along with
MIN_REDACTED = 4  # characters of a secret value for it to be redacted from what a guest sends
CHILD_EVENT = "tenantflow.child-ended:"  # + the child's id
RESERVED_EVENT_PREFIX = "tenantflow."  # event types the kernel sends itself; tenants cannot

# (parent record, workflow, code ref or "" for the parent's own, params JSON, child id) -> the child
Spawn = Callable[[InstanceRecord, str, str, str, str], Awaitable[InstanceRecord]]


class Stop(Exception):
    """Stop driving this instance now: a commit was refused (a lost lease, a bumped generation) or
    storage failed; nothing more is written for it."""


@dataclasses.dataclass
class Flight:
    """A step attempt in flight: its number, when it times out, and the policy it runs under."""

    attempt: int
    deadline: float
    policy: dict[str, Any]
    timeout: float  # the policy's, or the kernel's ceiling if that is lower
    started: float
    reads: int = 0  # ctx.kv and ctx.secrets reads answered (kernel/stepreach.py)
    kv_reads: KVReads = dataclasses.field(default_factory=KVReads)  # checked when its writes commit
    conflicts: int = 0  # runs of this attempt before, refused by a KV conflict in a row


def foldable(change: Change, into: Change | None = None) -> bool:
    """Whether ``change`` guards nothing but generation and lease (as ``into``'s), and, when
    ``into`` is given, only adds steps and history: folded into ``into`` it commits exactly when it
    would have committed on its own in the same transaction."""
    if change.expect_status or change.consume_events or change.add_events or change.bump_generation:
        return False
    if change.delete_steps_from is not None or change.kv or change.kv_reads or change.kv_ranges:
        # kv: may be refused by the tenant's quota or the attempt's read set
        return False
    if into is None:
        return True
    return (not change.set and not change.wake_on_events and not change.pause_aware
            and (change.generation, change.owner) == (into.generation, into.owner))  # fmt: skip


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


def guest_entry(step: StepRecord) -> dict[str, Any]:
    """A recorded step as the guest's journal holds it (replayed without asking the kernel)."""
    entry: dict[str, Any] = {"key": step.key, "name": step.name, "kind": step.kind, "status": step.status}
    if step.status == "complete" and step.output_json:
        entry["value"] = json.loads(step.output_json)
    if step.status == "failed":
        entry["error"] = {"name": step.error_name, "message": step.error_message, "type": step.event_type}
    return entry


class Journal:
    """One instance's journal during one run of its workflow (a wake-up).

    ``steps`` holds the recorded steps by key (loaded by :meth:`load`, updated by the step kinds),
    ``flights`` the attempts running now. What the step kinds learn for the end of the run goes in
    ``wakes`` (when to wake again), ``wait_types`` (event types that wake it) and ``hibernating``.
    """

    def __init__(
        self,
        record: InstanceRecord,
        config: KernelConfig,
        storage: Storage,
        committer: Committer,
        spawn: Spawn,
        *,
        on_abort: Callable[[], None] = lambda: None,
        last_words: Callable[[], list[HistoryEntry]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.record = record
        self.config = config
        self.spawn = spawn  # step.create's way to the kernel's create path
        self.now = clock
        self.steps: dict[str, StepRecord] = {}
        self.flights: dict[str, Flight] = {}
        self.wakes: list[float] = []
        self.wait_types: set[str] = set()
        self.hibernating = False  # some branch sleeps or waits for an event
        self.next_seq = 1
        self.ended = False  # the run's last commit is made (or being made)
        self.pause_requested = False
        self.aborted = ""  # stopped from outside (terminated, restarted, lease lost): write nothing more
        self.state_bytes = 0  # bytes of step outputs stored for the instance (journal + this run)
        self.riders: list[Change] = []  # committed in the next awaited change's transaction
        # Once the run's last change is committed: until when nothing it wrote can be due (see
        # _quiet_until); None: it may have made work due now (the dispatcher then looks at once).
        self.quiet_until: float | None = None
        self._storage = storage
        self._committer = committer
        self._on_abort = on_abort
        self._last_words = last_words  # history the run's last commit adds (e.g. dropped log lines)
        self._pending: list[Change] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._claimed: set[int] = set()  # inbox events a step of this run has taken to consume
        self._secrets: set[str] = set()  # secret values given to this run's attempts (redacted)

    @property
    def storage(self) -> Storage:
        return self._storage

    def remember_secret(self, value: str) -> None:
        """A secret value given to an attempt: from now on redacted from what the guest sends
        (values under :data:`MIN_REDACTED` characters are not: they would mask common text)."""
        if len(value) >= MIN_REDACTED:
            self._secrets.add(value)

    def redact(self, value: Any) -> Any:
        """``value`` (text, or JSON-like data) with every secret value given to this run replaced
        by ``***``, longest first (so a secret holding another is hidden whole)."""
        if not self._secrets:
            return value
        if isinstance(value, str):
            for secret in sorted(self._secrets, key=len, reverse=True):
                value = value.replace(secret, "***")
            return value
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        if isinstance(value, dict):
            return {self.redact(k): self.redact(v) for k, v in value.items()}
        return value

    # -- reading ------------------------------------------------------------------------------------
    async def load(self, fresh: bool = False) -> None:
        """Read the recorded steps (``fresh``: the instance was created just now and has none)."""
        if not fresh:
            rec = self.record
            self.steps = {
                s.key: s for s in await asyncio.to_thread(self._storage.get_steps, rec.tenant, rec.id)
            }
        self.next_seq = max((s.seq for s in self.steps.values()), default=0) + 1
        self.state_bytes = sum(len(s.output_json or "") for s in self.steps.values())

    def known(self, key: str) -> StepRecord:
        """The recorded step ``key``; ``ValueError`` if the instance has none."""
        step = self.steps.get(key)
        if step is None:
            raise ValueError(f"unknown step {key!r}")
        return step

    def new_step(self, key: str, name: str, kind: str) -> StepRecord:
        """Record a step asked for the first time (committed with its first decision)."""
        step = StepRecord(
            key=key, seq=self.next_seq, name=name, kind=kind, status="new", updated_at=self.now()
        )
        self.next_seq += 1
        self.steps[key] = step
        return step

    def guest_journal(self) -> list[dict[str, Any]]:
        """The recorded steps, in order, as the guest replays them."""
        return [guest_entry(s) for s in sorted(self.steps.values(), key=lambda s: s.seq)]

    async def next_event(self, type: str) -> EventRecord | None:
        """The oldest unread event of ``type`` in the instance's inbox that no other step of this
        run has taken (so two parallel waits never consume one event). Take it with :meth:`claim`
        before the next ``await``."""
        rec = self.record
        while True:
            limit = len(self._claimed) + 1  # enough to pass every event taken so far
            events = await asyncio.to_thread(
                self._storage.get_events, rec.tenant, rec.id, unconsumed_only=True, type=type, limit=limit
            )
            free = next((e for e in events if e.seq not in self._claimed), None)
            if free is not None or len(events) < limit or limit > len(self._claimed):
                return free
            # another step took events while this one read: read again, past them

    def claim(self, event: EventRecord) -> None:
        """Take ``event`` for a step of this run (its commit consumes it)."""
        self._claimed.add(event.seq)

    async def take_events(self, type: str) -> list[EventRecord]:
        """Take every unread event of ``type`` no other step of this run has taken."""
        rec = self.record
        events = await asyncio.to_thread(
            self._storage.get_events, rec.tenant, rec.id, unconsumed_only=True, type=type
        )
        mine = [e for e in events if e.seq not in self._claimed]
        self._claimed.update(e.seq for e in mine)
        return mine

    async def instance(self, id: str) -> InstanceRecord | None:
        """Another instance of this instance's tenant (a child), as stored now."""
        return await asyncio.to_thread(self._storage.get_instance, self.record.tenant, id)

    # -- recording ----------------------------------------------------------------------------------
    async def start(self) -> bool:
        """Mark the instance running for this run; False if it must not run now (paused, or its
        lease lost meanwhile). A pause asked for before the start keeps its status, and the run goes
        on to its next step boundary."""
        result = await self._committer.submit(self.change(
            set={"status": Status.RUNNING},
            expect_status=frozenset({Status.QUEUED, Status.RUNNING, Status.WAITING}),
            history=[self.status_entry(Status.RUNNING)] if self.record.status != Status.RUNNING else [],
        ))  # fmt: skip
        if not result.ok and result.status == Status.WAITING_FOR_PAUSE:
            self.pause_requested = True
            result = await self._committer.submit(
                self.change(expect_status=frozenset({Status.WAITING_FOR_PAUSE}))
            )
        if not result.ok:
            if result.status == Status.PAUSED:  # paused between claim and start
                await self._committer.submit(self.change(set={"lease_owner": None, "lease_until": None}))
            return False
        return True

    def change(self, **kwargs: Any) -> Change:
        """A change to this instance, guarded by its generation and this node's lease."""
        return Change(
            tenant=self.record.tenant, id=self.record.id, generation=self.record.generation,
            owner=self.config.node_id, now=self.now(), **kwargs,
        )  # fmt: skip

    def history(self, kind: str, step: StepRecord | None = None, **kwargs: Any) -> HistoryEntry:
        """A timeline entry; an undo's says so in its data (``"undo": true``): it bears the name of
        the step it undoes."""
        if step is not None and step.kind == "undo":
            kwargs["data_json"] = json.dumps({**json.loads(kwargs.get("data_json") or "{}"), "undo": True})
        return HistoryEntry(kind=kind, at=self.now(), step=step.name if step else "", **kwargs)

    def status_entry(self, status: Status, message: str = "") -> HistoryEntry:
        return HistoryEntry(kind="status", at=self.now(), status=int(status), message=message)

    def submit(self, change: Change) -> None:
        """Record a change nobody waits for (a step started, a log line). It is committed with the
        next awaited change, or within ``FLUSH_DELAY``, so a fast step costs one commit, not two."""
        self._pending.append(change)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush)

    async def commit(self, change: Change) -> None:
        """Commit ``change`` (with what was submitted before it, and the riders) and learn whether a
        pause was asked for meanwhile; :class:`Stop` if it was refused or storage failed."""
        if self.ended and (words := self._last_words()):  # the run's last commit says it once
            change = dataclasses.replace(change, history=[*change.history, *words])
        change = self._with_pending(change)
        riders, self.riders = self.riders, []
        try:
            result = await self._committer.commit(change, riders)
        except (ResourceExhausted, KVConflictError):
            raise  # the tenant's key-value quota or a read set refused the change: the step kind decides
        except Conflict as exc:
            self.aborted = self.aborted or str(exc)
            raise Stop(str(exc)) from None
        except Exception as exc:  # storage failed (disk full, locked): nothing was written
            log.error("commit for %s/%s failed (%s); the wake-up stops and replays after its lease",
                      self.record.tenant, self.record.id, exc)  # fmt: skip
            self.abort(f"storage failed: {exc}")
            raise Stop(str(exc)) from None
        if self.ended:
            self.quiet_until = _quiet_until(change, riders)
        # Pause and Resume reach a run on another node through storage: it learns of them here.
        if result.status == Status.WAITING_FOR_PAUSE:
            self.pause_requested = True
        elif result.status == Status.RUNNING:
            self.pause_requested = False

    def abort(self, reason: str) -> None:
        """Write nothing more for this run, and stop whatever drives it."""
        if not self.aborted:
            self.aborted = reason
        self._pending.clear()
        self._on_abort()

    def notify_parent(self, status: Status) -> None:
        """Have the change that ends this instance (the next commit) carry its parent's notice: the
        committer keeps them in one transaction, so no crash can end a child without telling its
        parent."""
        notice = parent_notice(self.record, status, self.now())
        if notice is not None and not self.aborted:
            self.riders.append(notice)

    async def end_errored(self, error: dict[str, str]) -> None:
        """End the instance errored with ``error`` (name, message, and traceback if any)."""
        metrics.outcome(self, "errored")
        self.ended = True
        self.notify_parent(Status.ERRORED)
        change = self.change(
            set={"status": Status.ERRORED, "error_name": error["name"], "error_message": error["message"],
                 "error_traceback": error.get("traceback", ""),
                 "run_at": None, "lease_owner": None, "lease_until": None},
            history=[dataclasses.replace(
                self.status_entry(Status.ERRORED, f"{error['name']}: {error['message']}"),
                data_json=json.dumps({"traceback": error["traceback"]}) if error.get("traceback") else "")],
        )  # fmt: skip
        try:
            await self.commit(change)
        except Stop:
            pass

    # -- batching -----------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        for change in pending:
            future = self._committer.submit(change)
            future.add_done_callback(self._check_async_commit)

    def _with_pending(self, change: Change) -> Change:
        """``change`` (about to be awaited) with the pending changes folded in when its guards are
        theirs, so they cost no statements of their own and commit exactly as they would have in its
        transaction; otherwise they are queued just before it."""
        pending = self._pending
        if pending and foldable(change) and all(foldable(p, change) for p in pending):
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


def _quiet_until(change: Change, riders: list[Change]) -> float | None:
    """Until when nothing the run's last ``change`` (and its ``riders``) wrote can be due: its
    instance ended (``inf``), or sleeps until its ``run_at`` with no event that could wake it
    sooner; None when it may be due now (a parent told, events awaited, anything else)."""
    if riders or change.wake_on_events:
        return None
    status = change.set.get("status")
    if status in TERMINAL:
        return math.inf
    run_at = change.set.get("run_at")
    return float(run_at) if isinstance(run_at, (int, float)) else None
