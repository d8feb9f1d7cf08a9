"""Records the kernel keeps in storage, and the unit of change storage engines apply."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tenantflow.kernel.tenantkv import KVRange


class Status(enum.IntEnum):
    """Mirrors ``tenantflow.v1.Status``."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    ERRORED = 4
    TERMINATED = 5
    COMPLETE = 6
    WAITING = 7
    WAITING_FOR_PAUSE = 8


TERMINAL = frozenset({Status.ERRORED, Status.TERMINATED, Status.COMPLETE})
LIVE_STEP = frozenset(
    {"running", "retrying", "sleeping", "waiting"}
)  # steps that end with a terminated instance


@dataclass
class InstanceRecord:
    """One workflow instance and its envelope (tenant, workflow, pinned code, runtime, params)."""

    tenant: str
    id: str
    workflow: str
    code: str
    runtime: str
    module: str
    params_json: str
    status: Status = Status.QUEUED
    output_json: str = ""
    error_name: str = ""
    error_message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    run_at: float | None = None
    generation: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    parent: str = ""  # the id of the instance (same tenant) whose step.create started this one
    # At most concurrency_limit (0: no limit) instances of (tenant, workflow, concurrency_key) hold
    # a lease at once; storage's claim enforces it.
    concurrency_key: str = ""
    concurrency_limit: int = 0
    error_traceback: str = ""  # the tenant's own frames where run() raised, at most 4 KiB


@dataclass
class ScheduleRecord:
    """A tenant's cron schedule. Each fire creates the instance ``<name>@<fire time>``; ``version``
    is set by storage and guards every update (compare-and-set)."""

    tenant: str
    name: str
    cron: str
    time_zone: str
    workflow: str
    code: str
    params_json: str = ""
    overlap: str = "skip"  # skip | allow
    catchup: str = "skip"  # skip | run_once
    catchup_window: float = 60.0  # seconds; a fire later than this was missed
    paused: bool = False
    next_fire: float | None = None  # None while paused
    last_fire: float | None = None
    last_instance: str = ""
    fires: int = 0
    skipped: int = 0
    last_error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None


@dataclass
class StepRecord:
    """One journal entry, keyed by ``name#occurrence``; ``seq`` is the order steps were first asked for."""

    key: str
    seq: int
    name: str
    kind: str  # do | sleep | wait | create | wait_instance | undo | rollback
    status: str  # running | complete | failed | retrying | sleeping | waiting
    attempts: int = 0
    output_json: str = ""
    error_name: str = ""
    error_message: str = ""
    wake_at: float | None = None
    event_type: str = ""
    updated_at: float = 0.0
    error_traceback: str = ""  # the tenant's own frames where the last attempt raised, at most 4 KiB


@dataclass
class EventRecord:
    """An event in an instance's inbox; ``consumed_by`` is the wait step key that received it."""

    seq: int
    type: str
    payload_json: str
    created_at: float
    consumed_by: str = ""

    @property
    def size(self) -> int:
        """The bytes it holds in an inbox (type and payload, UTF-8), as inbox caps count them."""
        return len(self.type.encode("utf-8", "surrogatepass")) + len(
            self.payload_json.encode("utf-8", "surrogatepass")
        )


@dataclass
class HistoryEntry:
    """One line of an instance's timeline, as streamed by ``Watch``. ``seq`` is set by storage."""

    kind: str
    at: float
    status: int = 0
    step: str = ""
    attempt: int = 0
    message: str = ""
    data_json: str = ""
    seq: int = 0


@dataclass
class Artifact:
    """Published tenant code: immutable, content-addressed by ``digest``."""

    tenant: str
    name: str
    digest: str
    runtime: str
    files: dict[str, bytes]
    workflows: dict[str, str]  # entrypoint class -> module defining it
    created_at: float


@dataclass
class ArtifactVersion:
    """A published version as ``Code.List`` shows it: an :class:`Artifact` without its files."""

    tenant: str
    name: str
    digest: str
    runtime: str
    workflows: dict[str, str]
    created_at: float  # when this digest was first published


@dataclass
class TenantSummary:
    """A tenant as the operator's listing shows it (``Tenants.List``)."""

    tenant: str
    instances: int = 0  # every instance it has, ended ones included
    live: int = 0  # not yet complete, errored or terminated
    schedules: int = 0
    code_versions: int = 0  # published (name, digest) pairs


@dataclass
class Change:
    """An atomic, guarded update of one instance. Storage applies a batch of these in one commit.

    Guards: ``generation`` (None = any) must match, ``owner`` (None = any) must hold the lease,
    ``expect_status`` (empty = any) must contain the current status. A failed guard rolls back this
    change only and reports why.

    ``after_previous`` makes the change a rider (a parent's notice riding on its child's end): it
    applies only if the unit's main change (the nearest change before it in the batch without the
    flag) applied, decided in the same transaction; otherwise it is reported not ok with
    :data:`SKIPPED`. Riders of one main change do not depend on each other.
    """

    tenant: str
    id: str
    generation: int | None = None
    owner: str | None = None
    expect_status: frozenset[Status] = frozenset()
    set: dict[str, Any] = field(default_factory=dict)  # instance columns -> new values
    steps: list[StepRecord] = field(default_factory=list)  # upserted by key
    delete_steps_from: int | None = None  # delete journal entries with seq >= this (restart)
    # ... and give the events they consumed back to the inbox; without it those events stay spent
    # (their consumed_by becomes the step key + SPENT, so no later step of that key owns them)
    release_events: bool = False
    consume_events: list[tuple[int, str]] = field(default_factory=list)  # (event seq, step key)
    add_events: list[EventRecord] = field(default_factory=list)  # seq assigned by storage
    history: list[HistoryEntry] = field(default_factory=list)
    wake_on_events: list[str] = field(default_factory=list)  # unconsumed event of a type -> run_at = now
    # ... the same, but only for a type one of the instance's steps is waiting for (status "waiting",
    # that event_type): an event nobody waits for is kept, and wakes nobody
    wake_waiting: list[str] = field(default_factory=list)
    # (events, bytes): refuse the change (ApplyResult.unread says why) if the instance's unread events
    # and add_events together would pass either; 0: no cap on that one
    inbox_cap: tuple[int, int] = (0, 0)
    pause_aware: bool = False  # if stored status is WAITING_FOR_PAUSE: become PAUSED, run_at NULL
    bump_generation: bool = False
    now: float = 0.0
    after_previous: bool = False  # a rider: applied only if the unit's main change applied
    # The tenant's key-value writes (key, JSON or None to delete) a step attempt made, applied in this
    # change's transaction if it applies; past ``kv_quota`` (max keys, max bytes; 0: none) the whole
    # change is refused and ApplyResult.kv_refused says why.
    kv: list[tuple[str, str | None]] = field(default_factory=list)
    kv_quota: tuple[int, int] = (0, 0)
    # The attempt's read set (kernel/tenantkv.py), checked in the same transaction before ``kv``
    # applies: a key read whose version changed, or a listed page that would list other keys,
    # refuses the whole change and ApplyResult.kv_conflict says why.
    kv_reads: list[tuple[str, int]] = field(default_factory=list)  # (key, version seen; 0: absent)
    kv_ranges: list[KVRange] = field(default_factory=list)


SKIPPED = "not applied: the change it rides on was refused"
SPENT = " (before a restart)"  # appended to the consumed_by of events a restart left spent


@dataclass
class ApplyResult:
    """How one ``Change`` went: ``ok``, or the guard that failed; sequences of added events."""

    ok: bool
    reason: str = ""
    event_seqs: list[int] = field(default_factory=list)
    status: Status | None = None  # the status after the change
    unread: tuple[int, int] | None = None  # refused by inbox_cap: (events, bytes) already unread
    kv_refused: str = ""  # refused by kv_quota: which quota, and the flag that raises it
    kv_conflict: str = ""  # refused by kv_reads / kv_ranges: which read changed


def inbox_refusal(change: Change, count: int, size: int) -> ApplyResult | None:
    """How storage refuses ``change`` when the ``count`` events of ``size`` bytes its instance has
    unread, with its ``add_events``, would pass its ``inbox_cap``; None when they fit."""
    max_events, max_bytes = change.inbox_cap
    adding = sum(e.size for e in change.add_events)
    if (max_events and count + len(change.add_events) > max_events) or (
        max_bytes and size + adding > max_bytes
    ):
        return ApplyResult(False, f"the inbox of instance {change.id!r} is full", unread=(count, size))
    return None
