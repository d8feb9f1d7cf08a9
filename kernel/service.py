"""The kernel's operations, independent of gRPC: create, inspect, control, events, watch, publish."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from tenantflow.kernel import children, metrics, rollback, schedules, upgrade, workspace
from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.dispatch import Dispatcher
from tenantflow.kernel.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    excerpt,
)
from tenantflow.kernel.executor import Engine
from tenantflow.kernel.firebudget import ScheduleLimits
from tenantflow.kernel.journal import RESERVED_EVENT_PREFIX, parent_notice
from tenantflow.kernel.jsonsafe import check_json
from tenantflow.kernel.model import (
    LIVE_STEP,
    TERMINAL,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    StepRecord,
)
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.quotas import CreationRate
from tenantflow.kernel.retention import purge_forever
from tenantflow.kernel.sandbox import CodeWarning, Sandbox
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.validate import (
    CODE_NAME,
    MAX_NAME,
    check_concurrency,
    check_files,
    check_id,
    check_name,
    check_ref,
    check_tenant,
    check_workflow,
)

log = logging.getLogger("tenantflow.kernel")
# Watch re-reads storage for changes committed by other nodes: first after 0.1 s, doubling while
# nothing changes, up to 1 s; and slower when many streams watch, to stay within the poll budget.
WATCH_POLL_SECONDS = (0.1, 1.0)
WATCH_POLLS_PER_SECOND = 200.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class CreateSpec:
    """One instance to create."""

    workflow: str
    code: str
    id: str = ""
    params_json: str = ""
    parent: str = ""  # set by step.create only; the API cannot name a parent
    concurrency_key: str = ""
    concurrency_limit: int = 0  # 0: no limit
    schedule: str = ""  # set by a schedule's fire only


TIMELINE_EXPORT_ENTRIES = 10_000  # an exported history keeps the end of a longer timeline


@dataclass
class InstanceView:
    """An instance with its journal, as ``Get`` returns it."""

    record: InstanceRecord
    steps: list[StepRecord]


@dataclass(frozen=True)
class ListFilters:
    """What List narrows a tenant's instances to, beyond their status."""

    workflow: str = ""
    created_after: float | None = None  # inclusive
    created_before: float | None = None  # exclusive


@dataclass(frozen=True)
class Published:
    """What ``Code.Publish`` returns: the pinned ref, the runtime, the workflow classes, the warnings."""

    ref: str
    runtime: str
    workflows: list[str]
    warnings: tuple[CodeWarning, ...] = ()


@dataclass
class ExportedHistory:
    """An instance's whole record, as ``ExportHistory`` returns it."""

    record: InstanceRecord
    steps: list[StepRecord]
    events: list[EventRecord]  # consumed or not, oldest first
    timeline: list[HistoryEntry]  # the last TIMELINE_EXPORT_ENTRIES, oldest first


class Notifier:
    """Wakes ``Watch`` streams when an instance's history changes."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}

    def touch(self, changes: list[Change]) -> None:
        for change in changes:
            for event in self._waiters.get((change.tenant, change.id), ()):
                event.set()

    async def wait(self, tenant: str, id: str, timeout: float) -> None:
        """Until the instance changes or ``timeout`` passes. Each watcher has its own event, and an
        instance nobody watches holds no entry."""
        key, event = (tenant, id), asyncio.Event()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters.discard(event)
            if not waiters:
                del self._waiters[key]

    def __len__(self) -> int:
        return len(self._waiters)


class Kernel:
    """Owns storage, sandboxes, loaders, the committer, the engine and the dispatcher."""

    def __init__(
        self,
        config: KernelConfig | None = None,
        plugins: Plugins | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or KernelConfig()
        self.clock = clock  # the step kinds' time: a local run (kernel/devrun.py) skips it ahead
        self.plugins = plugins or Plugins()
        self.storage: Storage
        self.catalog: CodeCatalog
        self.committer: Committer
        self.engine: Engine
        self.dispatcher: Dispatcher
        self.schedules: schedules.Schedules
        self.notifier = Notifier()
        self.creation_rate = CreationRate(self.config.tenant_create_rate, self.config.tenant_create_burst)
        self.sandboxes: dict[str, Sandbox] = {}
        self._started = False

    async def start(self, dispatch: bool = True) -> None:
        """Open storage, warm the sandboxes, reclaim this node's leases and start dispatching
        (``dispatch=False``: nothing runs by itself, nor do schedules fire; a local run drives the
        wake-ups)."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.plugins.storage(self.config.resolved_storage_url(), self.config)
        sandboxes = self.sandboxes = self.plugins.sandboxes(self.config)
        for sandbox in sandboxes.values():
            await sandbox.start()
        loaders = self.plugins.loaders(self.storage, self.config)
        self.catalog = CodeCatalog(self.storage, loaders, sandboxes, self.config, self.plugins.unavailable)
        self.committer = Committer(self.storage, self.notifier.touch)
        self.committer.start()
        self.engine = Engine(
            self.storage,
            self.committer,
            self.catalog,
            self.config,
            self._spawn,
            on_idle=self._wake_up_ended,
            clock=self.clock,
        )
        self.dispatcher = Dispatcher(self.storage, self.engine, self.config)
        released = await asyncio.to_thread(self.storage.release_leases, self.config.node_id)
        if released:
            log.info("reclaimed %d instances this node was running when it stopped", released)
        if dispatch:
            self.dispatcher.start()
        c = self.config
        limits = ScheduleLimits(c.tenant_max_schedules, c.tenant_schedule_fire_rate, c.tenant_schedule_fire_burst,
                                c.schedule_min_interval)  # fmt: skip
        self.schedules = schedules.Schedules(self.storage, self._fire, c.node_id, limits)
        if dispatch:
            self.schedules.start()
        self._sweepers = [
            asyncio.create_task(self.catalog.sweep_forever(), name="tenantflow-code-sweep"),
            asyncio.create_task(
                purge_forever(self.storage, self.config.retention_seconds), name="tenantflow-retention"
            ),
        ]
        if (spaces := workspace.of(c.workspace_root, c.workspace_quota_bytes)) is not None:
            self._sweepers.append(asyncio.create_task(workspace.sweep_forever(spaces, self.storage)))
        self._started = True
        log.info("kernel started: storage %s, sandboxes %s, loaders %s", self.config.resolved_storage_url(),
                 sorted(sandboxes), sorted(loaders))  # fmt: skip

    def _poke(self) -> None:
        if self._started:
            self.dispatcher.poke()

    def _wake_up_ended(self, quiet_until: float | None) -> None:
        if self._started:
            self.dispatcher.ended(quiet_until)

    def scraped(self) -> metrics.Scraped:
        """What a ``/metrics`` scrape reads of this kernel."""
        return metrics.Scraped(
            wakeups_running=lambda: len(self.engine.active),
            code_cache=lambda: (len(self.catalog), self.catalog.bytes),
            count_by_status=getattr(self.storage, "count_by_status", None),
        )

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for sweeper in self._sweepers:
            sweeper.cancel()
        await self.schedules.stop()
        renewals_ended = await self.dispatcher.stop()
        writer_ended = await self.committer.stop()
        for sandbox in self.sandboxes.values():
            await sandbox.close()
        if (
            spaces := workspace.of(self.config.workspace_root, self.config.workspace_quota_bytes)
        ) is not None:
            await asyncio.to_thread(spaces.close)
        if writer_ended and renewals_ended:  # else storage is in use: process exit closes it, not us
            self.storage.close()

    # -- helpers ----------------------------------------------------------------------------------
    def _json(self, text: str, what: str) -> str:
        return check_json(text, what, self.config.max_payload_bytes)

    async def _record(self, tenant: str, id: str) -> InstanceRecord:
        check_tenant(tenant)
        check_id(id)
        record = await asyncio.to_thread(self.storage.get_instance, tenant, id)
        if record is None:
            raise NotFound(f"instance {id!r} not found in tenant {tenant!r}")
        return record

    async def _apply(self, change: Change, riders: Sequence[Change] = ()) -> None:
        await self.committer.commit(change, riders)

    # -- create -----------------------------------------------------------------------------------
    async def create(self, tenant: str, spec: CreateSpec) -> InstanceRecord:
        return (await self.create_batch(tenant, [spec]))[0]

    async def create_batch(self, tenant: str, specs: list[CreateSpec]) -> list[InstanceRecord]:
        check_tenant(tenant)
        if not specs:
            raise InvalidArgument("a batch needs at least one request")
        if len(specs) > self.config.max_batch:
            raise ResourceExhausted(
                f"a batch holds at most {self.config.max_batch} instances; got {len(specs)}"
            )
        now = self.clock()
        records: list[InstanceRecord] = []
        seen: set[str] = set()
        pins: dict[str, str] = {}
        for spec in specs:
            id = spec.id or uuid.uuid4().hex
            check_id(id)
            if "@" in id and not (spec.schedule or spec.parent):
                raise InvalidArgument(
                    f"bad instance id {excerpt(id)}: '@' is kept for the instances schedules start; "
                    "use letters, digits, '_' and '-'"
                )
            check_concurrency(spec.concurrency_key, spec.concurrency_limit)
            if id in seen:
                raise AlreadyExistsInBatch(f"instance id {id!r} appears twice in the batch")
            seen.add(id)
            check_workflow(spec.workflow)
            check_ref(spec.code)
            params = self._json(spec.params_json, "params_json")
            if spec.code not in pins:
                pins[spec.code] = await self.catalog.pin_async(tenant, spec.code)
            pinned = pins[spec.code]
            code = await self.catalog.get(tenant, pinned)
            module = code.workflows.get(spec.workflow)
            if module is None:
                defined = ", ".join(sorted(code.workflows)) or "none"
                raise InvalidArgument(
                    f"{pinned} defines no workflow class {spec.workflow!r} (it defines: {defined})"
                )
            records.append(InstanceRecord(
                tenant=tenant, id=id, workflow=spec.workflow, code=pinned, runtime=code.bundle.runtime,
                module=module, params_json=params, status=Status.QUEUED, created_at=now, updated_at=now, run_at=now,
                parent=spec.parent, concurrency_key=spec.concurrency_key, concurrency_limit=spec.concurrency_limit,
            ))  # fmt: skip
        history = [
            HistoryEntry(kind="status", at=now, status=int(Status.QUEUED), message="created")
            if not r.parent and not spec.schedule
            else HistoryEntry(kind="status", at=now, status=int(Status.QUEUED), message=f"created by {r.parent}",
                              data_json=json.dumps({"parent": r.parent}))
            if r.parent
            else HistoryEntry(kind="status", at=now, status=int(Status.QUEUED),
                              message=f"created by schedule {spec.schedule}",
                              data_json=json.dumps({"schedule": spec.schedule}))
            for r, spec in zip(records, specs, strict=True)
        ]  # fmt: skip
        self.creation_rate.take(tenant, len(records))
        # Instances this node can start now are created leased to it (no claim transaction before
        # their first step); the rest wait for the dispatcher's claim, fairly among tenants.
        limited = any(r.concurrency_limit for r in records)
        eager = self.dispatcher.reserve(tenant, len(records)) if self._started and not limited else 0
        until = now + self.config.lease_seconds
        # ... and running: their wake-up needs no commit of its own to mark them so (WakeUp.execute; its
        # "running" entry in the timeline rides on its first commit).
        leased = [  # copies: the caller sees its records as created, not yet picked up
            dataclasses.replace(r, lease_owner=self.config.node_id, lease_until=until, status=Status.RUNNING)
            for r in records[:eager]
        ]
        work = asyncio.ensure_future(
            asyncio.to_thread(self.storage.create_instances, [*leased, *records[eager:]], history,
                              self.config.tenant_max_live)
        )  # fmt: skip

        def settle(done: asyncio.Future[None]) -> None:  # adopt once committed, even if the caller left
            if done.cancelled() or done.exception() is not None:
                self.dispatcher.release(tenant, eager)
            else:
                self.dispatcher.adopt(leased)

        work.add_done_callback(settle)
        with metrics.counting_refusals(tenant, "max_live"):
            await asyncio.shield(work)
        if eager < len(records):  # the rest are the dispatcher's to claim
            self._poke()
        return records

    async def _spawn(
        self, parent: InstanceRecord, workflow: str, code: str, params_json: str, id: str
    ) -> InstanceRecord:
        """``step.create``: the parent's tenant, its own pinned code unless it names another ref of
        that tenant; the same checks and quotas as Create."""
        if code and code != parent.code:
            check_ref(code)
            children.check_child_ref(parent, code)
        spec = CreateSpec(workflow=workflow, code=code or parent.code, id=id, params_json=params_json,
                          parent=parent.id)  # fmt: skip
        return await self.create(parent.tenant, spec)

    async def _fire(self, schedule: ScheduleRecord, id: str) -> InstanceRecord:
        """A schedule's fire: Create with the schedule's workflow, code and params, and its id."""
        spec = CreateSpec(workflow=schedule.workflow, code=schedule.code, id=id,
                          params_json=schedule.params_json, schedule=schedule.name)  # fmt: skip
        return await self.create(schedule.tenant, spec)

    async def create_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Check the tenant, workflow, code ref and params as Create does, then store it."""
        check_tenant(schedule.tenant)
        check_workflow(schedule.workflow)
        check_ref(schedule.code)
        schedule.params_json = self._json(schedule.params_json, "params_json")
        pinned = await asyncio.to_thread(self.catalog.pin, schedule.tenant, schedule.code)  # exists now
        code = await self.catalog.get(schedule.tenant, pinned)
        if schedule.workflow not in code.workflows:
            defined = ", ".join(sorted(code.workflows)) or "none"
            raise InvalidArgument(
                f"{pinned} defines no workflow class {schedule.workflow!r} (it defines: {defined})"
            )
        return await self.schedules.create(schedule)

    # -- read -------------------------------------------------------------------------------------
    async def steps_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of an instance's step outputs and errors, before they are loaded; None where the
        storage cannot tell without loading them (then a Get is bounded only once loaded)."""
        check_tenant(tenant)
        check_id(id)
        counted = getattr(self.storage, "steps_bytes", None)
        size = None if counted is None else await asyncio.to_thread(counted, tenant, id)
        return None if size is None else int(size)

    async def history_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of an instance's step outputs, errors and events, before :meth:`export_history`
        loads them; None where the storage cannot tell without loading them."""
        steps = await self.steps_bytes(tenant, id)
        counted = getattr(self.storage, "events_bytes", None)
        if steps is None or counted is None:
            return None
        return steps + int(await asyncio.to_thread(counted, tenant, id))

    async def get(self, tenant: str, id: str) -> InstanceView:
        record = await self._record(tenant, id)
        steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
        return InstanceView(record, steps)

    async def list_instances(
        self,
        tenant: str,
        status: Status | None,
        page_size: int,
        page_token: str,
        filters: ListFilters | None = None,
    ) -> tuple[list[InstanceRecord], str]:
        check_tenant(tenant)
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument(f"page_size must be 0..1000 (0 means 50), got {page_size}")
        if page_token and not (page_token.isascii() and page_token.isdecimal() and len(page_token) <= 18):
            raise InvalidArgument("page_token is not one this kernel handed out; pass next_page_token as is")
        f = filters or ListFilters()
        records, cursor = await asyncio.to_thread(
            functools.partial(self.storage.list_instances, tenant, status, page_token or None, page_size or 50,
                              workflow=f.workflow, created_after=f.created_after, created_before=f.created_before)
        )  # fmt: skip
        return records, cursor or ""

    async def count_instances(self, tenant: str, status: Status | None, filters: ListFilters) -> int:
        """How many instances the filters match (List's ``include_count``)."""
        check_tenant(tenant)
        f = filters
        return await asyncio.to_thread(
            functools.partial(self.storage.count_instances, tenant, status, workflow=f.workflow,
                              created_after=f.created_after, created_before=f.created_before)
        )  # fmt: skip

    async def history(self, tenant: str, id: str, after: int, limit: int = 500) -> list[HistoryEntry]:
        return await asyncio.to_thread(self.storage.get_history, tenant, id, after, limit)

    async def export_history(self, tenant: str, id: str) -> ExportedHistory:
        """The instance's journal and inbox (bounded by the state and inbox caps) and the end of its
        timeline, for replay against other code."""
        record = await self._record(tenant, id)
        steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
        events = await asyncio.to_thread(self.storage.get_events, tenant, id, unconsumed_only=False)
        timeline: collections.deque[HistoryEntry] = collections.deque(maxlen=TIMELINE_EXPORT_ENTRIES)
        after = 0
        while page := await self.history(tenant, id, after, 1000):
            timeline.extend(page)
            after = page[-1].seq
        return ExportedHistory(record, steps, events, list(timeline))

    # -- control ----------------------------------------------------------------------------------
    async def pause(self, tenant: str, id: str) -> InstanceRecord:
        for _ in range(5):
            record = await self._record(tenant, id)
            if record.status in TERMINAL:
                raise FailedPrecondition(
                    f"instance {id!r} is {record.status.name.lower()}; only live instances pause "
                    "(restart it to run it again)"
                )
            if record.status in (Status.PAUSED, Status.WAITING_FOR_PAUSE):
                return record
            now = self.clock()
            leased = record.lease_owner is not None and (record.lease_until or 0) > now
            status = Status.WAITING_FOR_PAUSE if leased else Status.PAUSED
            change = Change(
                tenant=tenant, id=id, generation=record.generation, now=now,
                expect_status=frozenset({record.status}),
                set={"status": status} if leased else {"status": status, "run_at": None},
                history=[HistoryEntry(kind="status", at=now, status=int(status), message="pause requested")],
            )  # fmt: skip
            try:
                await self._apply(change)
            except Conflict:
                continue
            if leased:
                self.engine.request_pause(tenant, id)
            return await self._record(tenant, id)
        raise FailedPrecondition(f"instance {id!r} kept changing state; try Pause again")

    async def resume(self, tenant: str, id: str) -> InstanceRecord:
        record = await self._record(tenant, id)
        now = self.clock()
        if record.status == Status.WAITING_FOR_PAUSE:
            change = Change(tenant=tenant, id=id, now=now, expect_status=frozenset({Status.WAITING_FOR_PAUSE}),
                            set={"status": Status.RUNNING},
                            history=[HistoryEntry(kind="status", at=now, status=int(Status.RUNNING),
                                                  message="pause cancelled")])  # fmt: skip
            self.engine.request_pause(tenant, id, pause=False)
        elif record.status == Status.PAUSED:
            change = Change(tenant=tenant, id=id, now=now, expect_status=frozenset({Status.PAUSED}),
                            set={"status": Status.QUEUED, "run_at": now},
                            history=[HistoryEntry(kind="status", at=now, status=int(Status.QUEUED),
                                                  message="resumed")])  # fmt: skip
        else:
            raise FailedPrecondition(_not_paused(id, record.status))
        try:
            await self._apply(change)
        except Conflict as exc:
            raise FailedPrecondition(f"instance {id!r} changed state meanwhile ({exc}); try again") from None
        self._poke()
        return await self._record(tenant, id)

    async def terminate(
        self, tenant: str, id: str, *, rollback: bool = False, keep_children: bool = False
    ) -> InstanceRecord:
        """End a live instance. ``rollback``: first run the undos of its completed steps (it stays
        live until they are done, then ends terminated). Unless ``keep_children``, its live children
        (and theirs) are terminated the same way: a child is part of its parent's work, and nobody
        would await or clean up after an orphan."""
        record = await self._record(tenant, id)
        if record.status in TERMINAL:
            raise FailedPrecondition(
                f"instance {id!r} is already {record.status.name.lower()}: nothing to terminate "
                "(delete it to remove it, or restart it to run it again)"
            )
        steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
        await self._terminate_one(record, steps, rollback)
        if not keep_children:
            # Read again: a step.create that committed while the parent was being terminated is in
            # this read, and none can commit after (the terminate bumped the parent's generation).
            steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
            await self._terminate_children(tenant, steps, rollback)
        return await self._record(tenant, id)

    async def _terminate_one(
        self, record: InstanceRecord, steps: list[StepRecord], roll_back: bool, *, notify: bool = True
    ) -> None:
        tenant, id, now = record.tenant, record.id, self.clock()
        started = next((s for s in steps if s.key == rollback.KEY), None)
        live = frozenset(set(Status) - TERMINAL)
        roll_back = roll_back and record.runtime in rollback.RUNTIMES
        notice: Change | None = None  # the parent's, when this ends the instance now
        if roll_back and started is not None:
            return  # already rolling back: it ends terminated or errored once its undos are done
        if roll_back:
            error = {"name": "Terminated", "message": "terminated with rollback"}
            seq = max((s.seq for s in steps), default=0) + 1
            change = Change(
                tenant=tenant, id=id, now=now, expect_status=live, bump_generation=True,
                steps=[rollback.record(rollback.KEY, seq, "terminated", error, now)],
                set={"status": Status.QUEUED, "run_at": now, "lease_owner": None, "lease_until": None},
                history=[HistoryEntry(kind="status", at=now, status=int(Status.QUEUED),
                                      message="terminate requested: rolling back first")],
            )  # fmt: skip
        else:
            if started is not None and started.status == "running":  # a rollback cut short
                started.status, started.updated_at = "stopped", now
            # A step still waiting, sleeping or retrying ends with the instance, not left "waiting".
            ended = [dataclasses.replace(s, status="terminated", wake_at=None, updated_at=now)
                     for s in steps if s.status in LIVE_STEP and s.key != rollback.KEY]  # fmt: skip
            change = Change(
                tenant=tenant, id=id, now=now, expect_status=live, bump_generation=True,
                steps=[*ended, *([started] if started is not None else [])],
                set={"status": Status.TERMINATED, "run_at": None, "lease_owner": None, "lease_until": None},
                history=[HistoryEntry(kind="status", at=now, status=int(Status.TERMINATED), message="terminated")],
            )  # fmt: skip
            notice = parent_notice(record, Status.TERMINATED, now) if notify else None
        try:  # the parent's notice rides in the same transaction, never split from it
            await self._apply(change, [notice] if notice is not None else [])
        except Conflict as exc:
            raise FailedPrecondition(f"instance {id!r} ended meanwhile ({exc})") from None
        self.engine.kill(tenant, id, "terminated")
        if roll_back:
            self._poke()

    async def _terminate_children(
        self, tenant: str, steps: list[StepRecord], roll_back: bool, ids: list[str] | None = None
    ) -> None:
        """Breadth first, without recursion: a chain of children may be long. ``ids``: only these
        of the children in ``steps``, and without a notice to their parent (it stopped waiting)."""
        queue = children.child_ids(steps) if ids is None else list(ids)
        first = set() if ids is None else set(ids)
        while queue:
            child = await asyncio.to_thread(self.storage.get_instance, tenant, queue.pop(0))
            if child is None:
                continue
            child_steps = await asyncio.to_thread(self.storage.get_steps, tenant, child.id)
            if child.status not in TERMINAL:
                try:
                    await self._terminate_one(child, child_steps, roll_back, notify=child.id not in first)
                except FailedPrecondition:
                    pass  # it ended meanwhile
            queue.extend(children.child_ids(child_steps))

    async def delete(self, tenant: str, id: str) -> None:
        """Delete an instance and everything recorded for it; a live one is stopped first.

        A live child is first ended as terminated, its parent's notice in that same transaction
        (``delete_instance`` is no ``Change``, so it cannot carry the notice): a crash before the
        delete leaves a terminated child whose parent was told, never a parent waiting until its
        time-out for a child that is gone."""
        check_tenant(tenant)
        check_id(id)
        record = await asyncio.to_thread(self.storage.get_instance, tenant, id)
        if record is not None and record.parent and record.status not in TERMINAL:
            steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
            try:
                await self._terminate_one(record, steps, False)
            except FailedPrecondition:
                pass  # it ended meanwhile: the commit that ended it told the parent
        if not await asyncio.to_thread(self.storage.delete_instance, tenant, id):
            raise NotFound(f"instance {id!r} not found in tenant {tenant!r}")
        self.engine.kill(tenant, id, "deleted")  # its next commit finds no instance and writes nothing

    async def restart(
        self, tenant: str, id: str, from_step: str, *, keep_events: bool = False
    ) -> InstanceRecord:
        """Run the instance again from the start or ``from_step``. The events the deleted steps
        consumed stay spent (a rerun wait does not take the old approval again) unless
        ``keep_events`` gives them back to the inbox."""
        if len(from_step) > MAX_NAME:  # step names may hold any character: only the length is checked
            raise InvalidArgument(
                f"from_step is {len(from_step)} characters; step names have at most {MAX_NAME}"
            )
        record = await self._record(tenant, id)
        delete_from = 0
        message = "restarted from the start"
        if from_step:
            steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)
            match = next((s for s in steps if s.name == from_step and s.kind not in rollback.APART), None)
            if match is None:
                known = list(dict.fromkeys(excerpt(s.name) for s in steps))
                more = f" and {len(known) - 20} more" if len(known) > 20 else ""
                names = ", ".join(known[:20]) + more or "none yet"
                raise NotFound(f"instance {id!r} has no step named {from_step!r}; its steps: {names}")
            delete_from = match.seq
            message = f"restarted from step {from_step!r}"
        now = self.clock()
        change = Change(
            tenant=tenant, id=id, now=now, bump_generation=True, delete_steps_from=delete_from,
            release_events=keep_events,
            set={"status": Status.QUEUED, "run_at": now, "lease_owner": None, "lease_until": None,
                 "output_json": "", "error_name": "", "error_message": "", "error_traceback": ""},
            history=[HistoryEntry(kind="status", at=now, status=int(Status.QUEUED), message=message)],
        )  # fmt: skip
        self.engine.kill(tenant, id, "restarted")
        steps = await asyncio.to_thread(self.storage.get_steps, tenant, id)  # read once it is stopped
        await self._apply(change)
        self._poke()
        # The new run derives new ids for its children: those of the deleted create steps would run
        # on unawaited, held against the live cap. A child the workflow named is adopted again by
        # the new run's create, so it is left alone.
        dropped = [s for s in steps if s.seq >= delete_from]
        derived = {children.child_id(record, s.key) for s in dropped if s.kind == "create"}
        orphans = [c for c in children.child_ids(dropped) if c in derived]
        if orphans:
            await self._terminate_children(tenant, dropped, False, orphans)
        return await self._record(tenant, id)

    async def upgrade(
        self, tenant: str, to_code: str, ids: list[str], workflow: str, dry_run: bool
    ) -> list[upgrade.Outcome]:
        """Re-pin live instances to ``to_code``, each only if its journal replays cleanly on it
        (:mod:`tenantflow.kernel.upgrade`); ``dry_run`` replays and reports only."""
        check_tenant(tenant)
        check_ref(to_code)
        for id in ids:
            check_id(id)
        if workflow:
            check_workflow(workflow)
        pinned = await self.catalog.pin_async(tenant, to_code)
        code = await self.catalog.get(tenant, pinned)
        upgrader = upgrade.Upgrader(self.storage, self.catalog, self.config, self.plugins, self.committer.submit,
                                    self.clock)  # fmt: skip
        outcomes = []
        for chosen in await upgrader.select(tenant, ids, workflow):
            if isinstance(chosen, str):
                outcomes.append(
                    upgrade.Outcome(chosen, "", pinned, "skipped", f"instance {chosen!r} does not exist")
                )
            else:
                outcomes.append(
                    await upgrader.upgrade(chosen, pinned, code.bundle.runtime, code.workflows, dry_run)
                )
        self._poke()  # instances let go of may be due
        return outcomes

    async def send_event(self, tenant: str, id: str, type: str, payload_json: str) -> int:
        check_name(type, "event type")
        if type.startswith(RESERVED_EVENT_PREFIX):
            raise InvalidArgument(
                f"event types starting with {RESERVED_EVENT_PREFIX!r} are sent by the kernel itself; "
                "pick another type"
            )
        payload = self._json(payload_json, "payload_json")
        record = await self._record(tenant, id)
        if record.status in TERMINAL:
            raise FailedPrecondition(
                f"instance {id!r} is {record.status.name.lower()}; it takes no more events "
                "(restart it to run it again, then send the event)"
            )
        now = self.clock()
        config = self.engine.config
        change = Change(
            tenant=tenant, id=id, now=now, expect_status=frozenset(set(Status) - TERMINAL),
            add_events=[EventRecord(seq=0, type=type, payload_json=payload, created_at=now)],
            # Runnable now only if a step waits for this type (and it is not paused); else it is kept
            # for a later wait, and wakes nobody.
            wake_waiting=[type],
            inbox_cap=(config.max_inbox_events, config.max_inbox_bytes),
            history=[HistoryEntry(kind="event", at=now, message=f"event of type {type!r} received",
                                  data_json=json.dumps({"type": type}))],
        )  # fmt: skip
        result = await self.committer.submit(change)
        if result.unread is not None:
            count, size = result.unread
            raise ResourceExhausted(
                f"the inbox of instance {id!r} is full: {count} events ({size / MIB:.1f} MiB) are waiting to "
                f"be consumed, and an instance holds at most {config.max_inbox_events} unread events and "
                f"{config.max_inbox_bytes / MIB:g} MiB (the kernel's --max-inbox-events and --max-inbox-mb); "
                "the instance must consume events (step.wait_for_event of their type) before more can be sent"
            )
        if not result.ok:
            raise FailedPrecondition(f"instance {id!r} ended meanwhile ({result.reason})")
        self._poke()
        return result.event_seqs[0]

    async def watch(self, tenant: str, id: str) -> AsyncIterator[HistoryEntry]:
        """The instance's timeline from the start, then live, until it ends. Changes committed by
        this node wake the stream at once; changes another node commits are found by re-reading
        storage, soon after activity and less often while the instance is quiet."""
        await self._record(tenant, id)
        after = 0
        quiet = 0  # polls in a row that found nothing new
        while True:
            entries = await self.history(tenant, id, after)
            for entry in entries:
                after = entry.seq
                yield entry
            if entries:
                quiet = 0
                continue
            record = await self._record(tenant, id)
            if record.status in TERMINAL:
                rest = await self.history(tenant, id, after)
                for entry in rest:
                    yield entry
                if not rest:
                    return
                after = rest[-1].seq
                continue
            # Bounded cost: all the watchers of this node together poll at most WATCH_POLLS_PER_SECOND.
            floor = max(WATCH_POLL_SECONDS[0], len(self.notifier) / WATCH_POLLS_PER_SECOND)
            delay = min(WATCH_POLL_SECONDS[0] * 2**quiet, WATCH_POLL_SECONDS[1])
            await self.notifier.wait(tenant, id, max(delay, floor))
            quiet = min(quiet + 1, 16)

    # -- code -------------------------------------------------------------------------------------
    async def publish(
        self,
        tenant: str,
        name: str,
        runtime: str,
        files: Mapping[str, bytes],
        deadline: float | None = None,
        strict: bool = False,
    ) -> Published:
        """Check and store tenant code; ``strict``: refuse it if it has determinism hazards."""
        check_tenant(tenant)
        if not CODE_NAME.fullmatch(name):
            raise InvalidArgument(f"bad code name {excerpt(name)}: 1-100 of letters, digits, '_', '-', '.'")
        runtime = runtime or "python"
        if runtime not in self.sandboxes:
            raise InvalidArgument(
                f"unknown runtime {excerpt(runtime)}; installed: {sorted(self.sandboxes)}"
                + self.plugins.unavailable(runtime)
            )
        check_files(files)
        ref, workflows, warnings = await self.catalog.publish_async(
            tenant, name, runtime, files, deadline, strict
        )
        return Published(ref, runtime, workflows, warnings)


class AlreadyExistsInBatch(InvalidArgument):
    """Two requests in one batch use the same id."""


def _not_paused(id: str, status: Status) -> str:
    """Why Resume refuses, and what to do instead."""
    name = status.name.lower()
    if status in TERMINAL:
        return f"instance {id!r} is {name}, nothing to resume: restart it to run it again"
    return f"instance {id!r} is {name}, not paused: it goes on by itself (pause it first to hold it)"
