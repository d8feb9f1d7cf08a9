"""The storage contract: instances, journal, timers (``run_at``), event inbox, leases, artifacts,
schedules.

One transactional engine implements it (SQLite embedded, FoundationDB, ...). Everything is keyed
by tenant first, so no query can cross tenants. ``apply`` is the only write path for a running
instance, and it commits a whole batch atomically (the kernel's group commit).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from tenantflow.kernel.model import (
    ApplyResult,
    Artifact,
    ArtifactVersion,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    StepRecord,
    TenantSummary,
)
from tenantflow.kernel.tenantkv import NO_QUOTA, KVEntry, KVQuota, KVUsage, KVWrite

# bumped when a change breaks engines written against it (kernel/contracts.py). 2: key versions and
# read sets (KVEntry.version, Change.kv_reads/kv_ranges): an engine of 1 would lose updates silently.
CONTRACT_VERSION = 2


class Storage(Protocol):
    """A storage engine. Methods are blocking; the kernel calls them off its event loop."""

    def put_artifact(self, artifact: Artifact) -> None:
        """Store published code; storing the same (tenant, name, digest) again is a no-op."""
        ...

    def get_artifact(self, tenant: str, name: str, digest: str | None) -> Artifact | None:
        """The artifact with ``digest``, or the latest published under ``name`` when ``digest`` is None."""
        ...

    def list_artifacts(
        self, tenant: str, name: str | None, cursor: str | None, limit: int
    ) -> tuple[list[ArtifactVersion], str | None]:
        """The tenant's published versions (only ``name``'s when given), the most recently published
        first (publishing a version again makes it the newest); returns the page and the cursor of
        the next page (None on the last). A cursor is decimal digits, perhaps with a leading ``-``."""
        ...

    def create_instances(
        self, records: Sequence[InstanceRecord], history: Sequence[HistoryEntry], max_live: int = 0
    ) -> None:
        """Insert all records (and one history entry each) or none; raise ``AlreadyExists`` naming the
        id, or ``ResourceExhausted`` if a tenant would have more than ``max_live`` (0: no cap)
        instances not yet complete, errored or terminated."""
        ...

    def get_instance(self, tenant: str, id: str) -> InstanceRecord | None: ...

    def list_instances(
        self,
        tenant: str,
        status: Status | None,
        cursor: str | None,
        limit: int,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[InstanceRecord], str | None]:
        """Oldest first; returns the page and the cursor of the next page (None on the last).
        ``workflow`` (a class name), ``created_after`` (inclusive) and ``created_before``
        (exclusive) narrow the list; an engine that has to skip many instances to apply them may
        return a short (even empty) page with a cursor, so callers page until the cursor is None."""
        ...

    def count_instances(
        self,
        tenant: str,
        status: Status | None,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> int:
        """How many instances of ``tenant`` :meth:`list_instances` with these filters would list
        over all its pages (exact; may scan the tenant's instances)."""
        ...

    def get_steps(self, tenant: str, id: str) -> list[StepRecord]:
        """The journal in ``seq`` order."""
        ...

    def steps_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of the journal (at least its outputs, errors and tracebacks), counted without
        loading it, so a Get takes the response budget first; None when the engine cannot tell
        cheaply (then a Get is budgeted once loaded). Optional: the kernel treats a storage
        without it as answering None."""
        ...

    def events_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of the instance's events, read and unread (types and payloads, as
        :attr:`EventRecord.size`), counted without loading them, so an ExportHistory takes the
        response budget first; None when the engine cannot tell cheaply. Optional, like
        :meth:`steps_bytes`."""
        ...

    def get_events(
        self, tenant: str, id: str, *, unconsumed_only: bool, type: str | None = None, limit: int = 0
    ) -> list[EventRecord]:
        """The inbox oldest first (by ``seq``); only events of ``type`` when given, at most ``limit``
        (0: all). A wait reads the one it consumes this way: unconsumed, its type, limit 1, found
        through an index, so the other unread events cost it nothing."""
        ...

    def get_history(self, tenant: str, id: str, after_seq: int, limit: int) -> list[HistoryEntry]: ...

    def apply(self, changes: Sequence[Change]) -> list[ApplyResult]:
        """Apply every change whose guards hold, durably; one result per change, in order.

        A change with ``after_previous`` (a rider) applies only if its unit's main change (the
        nearest earlier change without the flag) applied, decided in the same transaction; else
        its result is not ok with reason ``SKIPPED``. A unit is never split across transactions.

        Either ``apply`` raises having applied nothing (the caller may retry the changes), or it
        returns one result per change. An engine that needs several transactions for one batch
        and fails after some committed (or cannot tell whether a commit applied) must not raise:
        it returns ok=False, with the storage error as the reason, for every change not known to
        be applied, so that nothing is ever applied twice.

        Journal: ``delete_steps_from`` deletes the entries from that seq on; the events they consumed
        go back to the inbox with ``release_events``, else stay consumed, their ``consumed_by``
        suffixed with ``SPENT``.

        Events: ``add_events`` get the next seqs. ``inbox_cap`` is checked in the transaction that
        stores them, against the unread events stored before the change, so concurrent senders
        cannot pass it together; a refused change writes nothing and reports ``unread``.
        ``wake_on_events`` sets ``run_at = now`` if an unconsumed event of one of its types exists;
        ``wake_waiting`` does the same only for a type one of the instance's steps is waiting for
        (status ``waiting``, that ``event_type``), so an event nobody waits for wakes nobody. Neither
        wakes an instance that ends the change paused, waiting for pause or ended.

        Key-value store: ``kv_reads`` and ``kv_ranges`` (a step attempt's read set) are checked in
        the transaction that applies the change, before ``kv`` is written: a key whose version is
        not the one read, or a listed page that would not list the same (key, version) pairs (or
        would now have a next page where it was the last), refuses the change, writing nothing, with
        ``kv_conflict`` saying which (``tenantkv.conflict`` does the comparing)."""
        ...

    def claim(
        self, owner: str, now: float, lease_seconds: float, limit: int, per_tenant: int = 0
    ) -> list[InstanceRecord]:
        """Lease up to ``limit`` instances with ``run_at <= now`` and no live lease, round-robin by
        tenant, leaving any tenant with ``per_tenant`` (0: no cap) instances leased alone.

        Concurrency limits: an instance with ``concurrency_limit`` N > 0 is leased only while fewer
        than N instances of its (tenant, workflow, concurrency_key) hold a live lease, counted in
        the same transaction that takes the lease (so across all nodes); within such a group the
        oldest ``run_at`` goes first. Instances held back this way hold back no other instance."""
        ...

    def renew_leases(
        self, owner: str, keys: Sequence[tuple[str, str]], until: float
    ) -> list[tuple[str, str]]:
        """Extend ``owner``'s leases; return the keys whose lease was lost."""
        ...

    def release_leases(self, owner: str) -> int:
        """Drop every lease ``owner`` holds (a restarted node reclaims its work at once)."""
        ...

    def delete_instance(self, tenant: str, id: str) -> bool:
        """Delete the instance with its journal, events and history; False if there was none."""
        ...

    def purge_ended(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` instances in a terminal status (complete, errored, terminated) last
        updated before ``before``, with their journal, events and history; return how many."""
        ...

    def next_run_at(self) -> float | None:
        """The earliest ``run_at`` of any unleased instance (the dispatcher sleeps until then)."""
        ...

    def count_by_status(self) -> dict[Status, int]:
        """How many instances have each status, across tenants (for metrics; may scan, so the
        kernel calls it at most every few seconds). Statuses with none may be left out."""
        ...

    def list_tenants(
        self, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None = None
    ) -> tuple[list[TenantSummary], str | None]:
        """Tenants with at least one instance, schedule or published code version, in name order:
        those whose name starts with ``prefix``, after ``cursor`` (a tenant name), that ``keep``
        accepts (asked before any of a tenant's counts is read), with their counts. Returns the
        page and the cursor of the next page (None on the last); an engine that skips many tenants
        may return a short (even empty) page with a cursor, so callers page until it is None.
        Each engine's docstring says what a page costs (an operator's listing, not a hot path)."""
        ...

    # -- schedules: every write but create and delete is a compare-and-set on ``version`` ----------
    def create_schedule(self, schedule: ScheduleRecord, max_per_tenant: int = 0) -> ScheduleRecord:
        """Insert it with version 1 and return it; raise ``AlreadyExists`` if the tenant has one of
        that name, or ``ResourceExhausted`` if it already has ``max_per_tenant`` (0: no cap)
        schedules, paused ones included (counted in the inserting transaction)."""
        ...

    def get_schedule(self, tenant: str, name: str) -> ScheduleRecord | None: ...

    def list_schedules(
        self, tenant: str, cursor: str | None, limit: int
    ) -> tuple[list[ScheduleRecord], str | None]:
        """By name; returns the page and the cursor of the next page (None on the last)."""
        ...

    def update_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord | None:
        """Store ``schedule`` if the stored version still equals ``schedule.version``; return it
        with the version bumped, or None if it changed meanwhile or is gone (read it again)."""
        ...

    def delete_schedule(self, tenant: str, name: str) -> bool: ...

    def claim_schedules(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        per_tenant: int = 0,
        skip: Collection[str] = (),
    ) -> list[ScheduleRecord]:
        """Lease up to ``limit`` schedules not paused with ``next_fire <= now`` and no live lease,
        bumping their versions: one node fires a schedule at a time. The fire itself is made safe
        by the instance's deterministic id, the lease only saves work.

        Round-robin by tenant, as ``claim``: each tenant's earliest due schedule first, then every
        tenant's second, and so on (earlier fire first within a round); at most ``per_tenant``
        (0: no cap) of one tenant, none of a tenant in ``skip`` (out of fire budget). Returned in
        that order. However many schedules one tenant has due, another tenant's due schedule is
        found by the same claim."""
        ...

    # -- a tenant's own key-value store (kernel/tenantkv.py) -----------------------------------------
    # Usage (keys, bytes) is a counter every write maintains; a quota is checked against it in the
    # writing transaction. ``Change.kv`` carries a step attempt's writes into ``apply``. Every write
    # (``apply``'s and ``kv_write``'s) stamps the keys it writes with a version greater than any the
    # key had before, deletes included (absent: 0); ``kv_get`` and ``kv_list`` return it.
    def kv_get(self, tenant: str, key: str) -> KVEntry | None: ...

    def kv_list(
        self, tenant: str, prefix: str, after: str | None, limit: int
    ) -> tuple[list[KVEntry], str | None]:
        """The tenant's keys starting with ``prefix``, after the key ``after`` (None: from the
        first), in key order (keys over 256 bytes sharing their first 256 may come in an order of the
        engine's own, the same on every call); the page and the cursor of the next (None: last)."""
        ...

    def kv_usage(self, tenant: str) -> KVUsage: ...

    def kv_write(
        self, tenant: str, writes: Sequence[KVWrite], now: float, quota: KVQuota = NO_QUOTA
    ) -> list[bool]:
        """Apply ``writes`` (a None value deletes) in one transaction; whether each key existed
        before its write. ``ResourceExhausted`` (naming the quota and its flag), writing nothing, if
        the tenant's usage would grow past ``quota``."""
        ...

    # -- secrets: sealed (encrypted) by the kernel; storage never sees a value ---------------------
    def put_secret(self, tenant: str, name: str, sealed: bytes, now: float) -> None: ...

    def get_secret(self, tenant: str, name: str) -> tuple[bytes, float] | None:
        """The sealed value and when it was set."""
        ...

    def delete_secret(self, tenant: str, name: str) -> bool: ...

    def list_secrets(
        self, tenant: str | None, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> list[tuple[str, str, bytes, float]]:
        """(tenant, name, sealed, updated_at) of ``tenant``'s secrets (None: every tenant's, for
        re-encryption), by tenant then name, after ``after``; at most ``limit``."""
        ...

    # -- a tenant's egress allow-list (kernel/egress.py): its rules as JSON -------------------------
    def put_egress(self, tenant: str, rules_json: str, now: float) -> None: ...

    def get_egress(self, tenant: str) -> tuple[str, float] | None:
        """The rules (JSON) and when they were set; None for a tenant never set."""
        ...

    def close(self) -> None: ...
