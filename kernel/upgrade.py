"""Upgrade: move live instances to new code, each only if its journal replays cleanly on it.

For every instance chosen, the journal is replayed on the new code first (:mod:`tenantflow.kernel.replay`:
a scratch store, the same sandbox, no step callback runs). Only an instance whose journal replays
cleanly is re-pinned, and never while a wake-up runs it on the old code:

1. the upgrade takes the instance's lease (owner ``<node>/upgrade``), guarded by its generation and
   by a status no running wake-up has (queued, waiting, paused). A wake-up that holds a lease but has
   not started cannot start any more: its first write (marking the instance running) is guarded by
   that lease, so it stops without running a step. Nobody claims an instance whose lease is live.
2. it reads the journal and the unread events, and replays them on the new code;
3. in one transaction guarded by that lease and the generation: the new code ref, the record of the
   change (a journal record kept apart from the steps, ``#pin``), a ``code_changed`` history entry,
   and the lease let go. A diverged instance only has its lease let go.

An instance a wake-up is running now is reported ``skipped`` (busy): upgrade it again once it sleeps
or waits. ``dry_run`` replays and reports, and takes no lease and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.model import (
    TERMINAL,
    ApplyResult,
    Change,
    HistoryEntry,
    InstanceRecord,
    Status,
    StepRecord,
)
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.replay import replay
from tenantflow.kernel.storage import Storage

PIN_KEY = "#pin"  # the journal record of an instance's re-pins; like "#rollback", never a step's key
LEASE_SECONDS = 60.0  # an upgrade that dies mid-way holds the instance this long at most
MAX_PER_CALL = 1000  # instances one Upgrade examines; the rest are reported, to be upgraded next call
IDLE = frozenset({Status.QUEUED, Status.WAITING, Status.PAUSED})  # statuses no running wake-up has


@dataclass(frozen=True)
class Outcome:
    """What Upgrade did with one instance (see ``UpgradeOutcome`` in the .proto)."""

    id: str
    from_code: str
    to_code: str
    result: str  # upgraded | compatible (dry run) | diverged | skipped
    reason: str = ""
    step: str = ""


def pin_changes(steps: list[StepRecord]) -> list[dict[str, object]]:
    """The re-pins recorded in an instance's journal, oldest first: ``{from, to, at}``."""
    record = next((s for s in steps if s.key == PIN_KEY), None)
    changes = json.loads(record.output_json) if record is not None and record.output_json else []
    return changes if isinstance(changes, list) else []


@dataclass
class Upgrader:
    """Upgrade of one tenant's instances, on one kernel's storage, catalog and sandboxes."""

    storage: Storage
    catalog: CodeCatalog
    config: KernelConfig
    plugins: Plugins
    commit: Callable[[Change], Awaitable[ApplyResult]]  # the kernel's committer
    clock: Callable[[], float]

    async def select(self, tenant: str, ids: list[str], workflow: str) -> list[InstanceRecord | str]:
        """The instances named (an id not found stays a string), or the live ones of ``workflow``."""
        if ids:
            if len(ids) > MAX_PER_CALL:
                raise InvalidArgument(f"at most {MAX_PER_CALL} instance ids per Upgrade; got {len(ids)}")
            found = [
                await asyncio.to_thread(self.storage.get_instance, tenant, id) for id in dict.fromkeys(ids)
            ]
            return [r if r is not None else id for r, id in zip(found, dict.fromkeys(ids), strict=True)]
        if not workflow:
            raise InvalidArgument(
                "name the instances to upgrade (ids) or the workflow class whose live instances move"
            )
        chosen: list[InstanceRecord | str] = []
        cursor: str | None = None
        while len(chosen) < MAX_PER_CALL:
            page, cursor = await asyncio.to_thread(self.storage.list_instances, tenant, None, cursor, 500)
            chosen += [r for r in page if r.workflow == workflow and r.status not in TERMINAL]
            if cursor is None:
                break
        return chosen[:MAX_PER_CALL]

    async def upgrade(self, record: InstanceRecord, to: str, runtime: str, workflows: dict[str, str],
                      dry_run: bool) -> Outcome:  # fmt: skip
        """Replay ``record`` on ``to`` and, unless ``dry_run``, re-pin it if it replays cleanly."""
        skip = self._skip(record, to, runtime, workflows)
        if skip is not None:
            return skip
        owner = f"{self.config.node_id}/upgrade"
        if not dry_run:
            now = self.clock()
            taken = await self.commit(Change(
                tenant=record.tenant, id=record.id, now=now, generation=record.generation, expect_status=IDLE,
                set={"lease_owner": owner, "lease_until": now + LEASE_SECONDS},
            ))  # fmt: skip
            if not taken.ok:
                return self._outcome(
                    record, to, "skipped", f"busy: {taken.reason}; upgrade it again once it sleeps or waits"
                )
        steps = await asyncio.to_thread(self.storage.get_steps, record.tenant, record.id)
        events = await asyncio.to_thread(
            self.storage.get_events, record.tenant, record.id, unconsumed_only=True
        )
        try:
            report = await replay(record, steps, events, to, catalog=self.catalog, config=self.config,
                                  plugins=self.plugins)  # fmt: skip
        except BaseException:
            if not dry_run:
                await self._release(record, owner)
            raise
        if not report.clean:
            if not dry_run:
                await self._release(record, owner)
            return self._outcome(record, to, "diverged", report.message, report.step)
        if dry_run:
            return self._outcome(record, to, "compatible", report.message)
        now = self.clock()
        pins = [*pin_changes(steps), {"from": record.code, "to": to, "at": now}]
        seq = next((s.seq for s in steps if s.key == PIN_KEY), max((s.seq for s in steps), default=0) + 1)
        pin = StepRecord(key=PIN_KEY, seq=seq, name="pin", kind="pin", status="complete",
                         output_json=json.dumps(pins), updated_at=now)  # fmt: skip
        entry = HistoryEntry(kind="code_changed", at=now, message=f"code changed from {record.code} to {to}",
                             data_json=json.dumps({"from": record.code, "to": to}))  # fmt: skip
        done = await self.commit(Change(
            tenant=record.tenant, id=record.id, now=now, generation=record.generation, owner=owner,
            set={"code": to, "lease_owner": None, "lease_until": None}, steps=[pin], history=[entry],
        ))  # fmt: skip
        if not done.ok:  # terminated, restarted or taken over meanwhile: nothing was changed
            return self._outcome(
                record, to, "skipped", f"changed meanwhile ({done.reason}); nothing was changed"
            )
        return self._outcome(record, to, "upgraded", report.message)

    def _skip(
        self, record: InstanceRecord, to: str, runtime: str, workflows: dict[str, str]
    ) -> Outcome | None:
        if record.status in TERMINAL:
            return self._outcome(record, to, "skipped", f"it has ended ({record.status.name.lower()})")
        if record.code == to:
            return self._outcome(record, to, "skipped", "it already runs on this code")
        if record.runtime != runtime:
            return self._outcome(
                record, to, "skipped", f"it runs on runtime {record.runtime!r}; the code is for {runtime!r}"
            )
        if record.workflow not in workflows:
            defined = ", ".join(sorted(workflows)) or "none"
            return self._outcome(
                record,
                to,
                "diverged",
                f"the code defines no workflow class {record.workflow!r} (it defines: {defined})",
            )
        if record.status not in IDLE:
            return self._outcome(
                record,
                to,
                "skipped",
                "busy: a wake-up is running it; upgrade it again once it sleeps or waits",
            )
        return None

    async def _release(self, record: InstanceRecord, owner: str) -> None:
        await self.commit(Change(tenant=record.tenant, id=record.id, now=self.clock(), owner=owner,
                                 set={"lease_owner": None, "lease_until": None}))  # fmt: skip

    @staticmethod
    def _outcome(record: InstanceRecord, to: str, result: str, reason: str = "", step: str = "") -> Outcome:
        return Outcome(record.id, record.code, to, result, reason, step)
