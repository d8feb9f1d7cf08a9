"""Schedules: a tenant's cron expressions (with a time zone) that create instances when they fire.

A fire at time T creates the instance ``<name>@<T as YYYYMMDDTHHMMSSZ>`` through the kernel's
ordinary create (pinning, quotas), so a fire can never start twice: not on two nodes, not after a
crash between the create and the schedule's update (the retry finds the instance and moves on).
Storage leases a due schedule to one node at a time (``claim_schedules``) and every schedule write
is a compare-and-set on its version, so the lease only saves work; the id is the guarantee.

Policies:
- overlap ``skip`` (default): no new instance while the one of the previous fire is live;
  ``allow``: start another alongside.
- catch-up, for fires missed while no kernel ran (a fire later than ``catchup_window`` seconds):
  ``skip`` (default) drops them and waits for the next fire; ``run_once`` starts one instance for
  all of them at once (the latest missed fire's id). Fires while paused are never made up.

Bounds (:mod:`tenantflow.kernel.firebudget`): schedules per tenant, the closest two fires of one
schedule, and fires per second per tenant. Claims are round-robin across tenants and at most
``PER_TENANT`` of one tenant's schedules are handled per pass, so one tenant's thousands of due
schedules delay another tenant's one by at most a pass. A fire always handles the latest tick
due; the ticks it passes over (the kernel was down, busy, or the tenant out of fire budget) are
counted as skipped, never dropped without a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import time
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from tenantflow.kernel import metrics
from tenantflow.kernel.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    TenantflowError,
    excerpt,
)
from tenantflow.kernel.firebudget import FireBudget, ScheduleLimits
from tenantflow.kernel.model import TERMINAL, InstanceRecord, ScheduleRecord
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.schedules")
NAME = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_-]{0,63}")
TIME_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}")
OVERLAP = ("skip", "allow")
CATCHUP = ("skip", "run_once")
MAX_CRON = 200
DEFAULT_WINDOW = 60.0
MAX_WINDOW = 366 * 86400.0
POLL_SECONDS = 0.5  # how soon a node sees a fire another node's RPC made due, or a clock tick
LEASE_SECONDS = 30.0
CLAIM_BATCH = 50  # schedules handled per pass of the fire loop
PER_TENANT = 10  # ... of one tenant at most
COUNTED = 1000  # passed-over ticks counted one by one per fire (past it: estimated, and logged)
GAP_SAMPLES = 200  # fires looked at to find a cron's closest two

# What fires an instance: (tenant, schedule, instance id) -> the instance (raises as Create does).
Fire = Callable[[ScheduleRecord, str], Awaitable[InstanceRecord]]


def fire_id(name: str, at: float) -> str:
    """The instance id of the fire of schedule ``name`` at ``at`` (UTC, to the second)."""
    return f"{name}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at))}"


def _zone(name: str) -> ZoneInfo:
    if not name:
        return ZoneInfo("UTC")
    if len(name) > 64 or not TIME_ZONE.fullmatch(name):
        raise InvalidArgument(f"bad time zone {excerpt(name)}: an IANA name such as 'Europe/Paris' or 'UTC'")
    try:
        return ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, or a name the tz database cannot read
        raise InvalidArgument(
            f"unknown time zone {excerpt(name)}: an IANA name such as 'Europe/Paris' or 'UTC'"
        ) from None


def next_fire(cron: str, time_zone: str, after: float) -> float:
    """The first fire strictly after ``after``, with the schedule's time zone (DST included)."""
    start = dt.datetime.fromtimestamp(after, _zone(time_zone))
    try:
        at: dt.datetime = croniter(cron, start).get_next(dt.datetime)
    except CroniterBadDateError:
        raise InvalidArgument(f"cron {excerpt(cron)} never fires (e.g. the 30th of February)") from None
    return at.timestamp()


def latest_fire(cron: str, time_zone: str, first: float, now: float) -> float:
    """The last fire at or before ``now``, no earlier than ``first`` (a due fire)."""
    start = dt.datetime.fromtimestamp(now + 0.001, _zone(time_zone))
    prev: dt.datetime = croniter(cron, start).get_prev(dt.datetime)
    return max(prev.timestamp(), first)


def passed_over(cron: str, time_zone: str, first: float, before: float) -> int:
    """How many ticks fall in ``[first, before)`` (``first`` a tick). Every-N-seconds crons are
    counted by arithmetic; others one by one up to ``COUNTED``, then extrapolated."""
    if before <= first:
        return 0
    fields = croniter(cron).expanded
    if all(f == ["*"] for f in fields[:5]):  # the same seconds every minute, whatever the zone
        seconds = [0] if len(fields) < 6 else range(60) if fields[5] == ["*"] else [int(x) for x in fields[5]]
        lo, hi = int(first), -int(-before // 1)  # ticks are whole seconds
        return sum((hi - 1 - x) // 60 - (lo - 1 - x) // 60 for x in seconds)
    it = croniter(cron, dt.datetime.fromtimestamp(first - 0.001, _zone(time_zone)))
    count, at = 0, first
    while count < COUNTED:
        at = it.get_next(dt.datetime).timestamp()
        if at >= before:
            return count
        count += 1
    return count + int((before - at) / max((at - first) / count, 1.0))


def upcoming(cron: str, time_zone: str, after: float, count: int = 3) -> list[float]:
    """The next ``count`` fires after ``after`` (fewer if the expression stops firing)."""
    it = croniter(cron, dt.datetime.fromtimestamp(after, _zone(time_zone)))
    fires: list[float] = []
    try:
        while len(fires) < count:
            fires.append(it.get_next(dt.datetime).timestamp())
    except CroniterBadDateError:
        pass
    return fires


def closest_fires(cron: str, time_zone: str, after: float) -> float:
    """The shortest time between two consecutive fires among the next ``GAP_SAMPLES``."""
    it = croniter(cron, dt.datetime.fromtimestamp(after, _zone(time_zone)))
    try:
        times: list[float] = [it.get_next(dt.datetime).timestamp() for _ in range(GAP_SAMPLES)]
    except CroniterBadDateError:
        return float("inf")
    return min(b - a for a, b in zip(times, times[1:], strict=False))


def check(s: ScheduleRecord) -> None:
    """Validate what a caller chose; raise InvalidArgument saying what to fix."""
    if not NAME.fullmatch(s.name or ""):
        raise InvalidArgument(
            f"bad schedule name {excerpt(s.name)}: 1-64 of letters, digits, '_' and '-', not starting with '-'"
        )
    fields = s.cron.split()
    if len(s.cron) > MAX_CRON or len(fields) not in (5, 6) or not croniter.is_valid(s.cron):
        raise InvalidArgument(
            f"bad cron expression {excerpt(s.cron)}: 5 fields (minute hour day month weekday), or 6 with "
            "seconds last, e.g. '0 9 * * 1-5' (09:00 on weekdays) or '* * * * * */10' (every 10 seconds)"
        )
    _zone(s.time_zone)
    if s.overlap not in OVERLAP:
        raise InvalidArgument(f"bad overlap policy {excerpt(s.overlap)}: one of {', '.join(OVERLAP)}")
    if s.catchup not in CATCHUP:
        raise InvalidArgument(f"bad catch-up policy {excerpt(s.catchup)}: one of {', '.join(CATCHUP)}")
    if not 1 <= s.catchup_window <= MAX_WINDOW:
        raise InvalidArgument(f"catchup_window_seconds must be 1..{MAX_WINDOW:.0f} (0 means 60)")


class Schedules:
    """The Schedules operations and the loop that fires due schedules on this node."""

    def __init__(
        self, storage: Storage, fire: Fire, node_id: str, limits: ScheduleLimits | None = None
    ) -> None:
        self._storage = storage
        self._fire = fire
        self._node = node_id
        self._limits = limits or ScheduleLimits()
        self._budget = FireBudget(self._limits.fire_rate, self._limits.fire_burst)
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- operations -------------------------------------------------------------------------------
    async def create(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Store a new schedule; its first fire is the first after now (none while paused)."""
        check(schedule)
        now = time.time()
        least = self._limits.min_interval
        if least > 1:  # cron's own finest is one second
            gap = await asyncio.to_thread(closest_fires, schedule.cron, schedule.time_zone, now)
            if gap < least:
                raise InvalidArgument(
                    f"cron {excerpt(schedule.cron)} fires {gap:g} s apart at its closest; a schedule on this "
                    f"kernel fires at most once every {least:g} s (--schedule-min-interval)"
                )
        s = dataclasses.replace(
            schedule, created_at=now, updated_at=now, version=0, fires=0, skipped=0, last_fire=None,
            last_instance="", last_error="", lease_owner=None, lease_until=None,
            next_fire=None if schedule.paused else next_fire(schedule.cron, schedule.time_zone, now),
        )  # fmt: skip
        with metrics.counting_refusals(s.tenant, "max_schedules"):
            made = await asyncio.to_thread(self._storage.create_schedule, s, self._limits.max_per_tenant)
        self._poke.set()
        return made

    async def get(self, tenant: str, name: str) -> ScheduleRecord:
        if not NAME.fullmatch(name or ""):
            raise InvalidArgument(f"bad schedule name {excerpt(name)}: 1-64 of letters, digits, '_' and '-'")
        found = await asyncio.to_thread(self._storage.get_schedule, tenant, name)
        if found is None:
            raise NotFound(f"schedule {name!r} not found in tenant {tenant!r}")
        return found

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[ScheduleRecord], str]:
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument(f"page_size must be 0..1000 (0 means 50), got {page_size}")
        if page_token and not NAME.fullmatch(page_token):
            raise InvalidArgument("page_token is not one this kernel handed out; pass next_page_token as is")
        found, cursor = await asyncio.to_thread(
            self._storage.list_schedules, tenant, page_token or None, page_size or 50
        )
        return found, cursor or ""

    async def pause(self, tenant: str, name: str) -> ScheduleRecord:
        return await self._change(
            tenant, name, lambda s, now: dataclasses.replace(s, paused=True, next_fire=None)
        )

    async def resume(self, tenant: str, name: str) -> ScheduleRecord:
        def resumed(s: ScheduleRecord, now: float) -> ScheduleRecord:
            if not s.paused:
                return s
            return dataclasses.replace(s, paused=False, next_fire=next_fire(s.cron, s.time_zone, now),
                                       lease_owner=None, lease_until=None)  # fmt: skip

        return await self._change(tenant, name, resumed)

    async def delete(self, tenant: str, name: str) -> None:
        await self.get(tenant, name)
        if not await asyncio.to_thread(self._storage.delete_schedule, tenant, name):
            raise NotFound(f"schedule {name!r} not found in tenant {tenant!r}")

    async def _change(
        self, tenant: str, name: str, how: Callable[[ScheduleRecord, float], ScheduleRecord]
    ) -> ScheduleRecord:
        for _ in range(10):  # compare-and-set: a fire may land in between
            s = await self.get(tenant, name)
            now = time.time()
            new = how(s, now)
            if new == s:
                return s
            done = await asyncio.to_thread(
                self._storage.update_schedule, dataclasses.replace(new, updated_at=now)
            )
            if done is not None:
                self._poke.set()
                return done
        raise Conflict(f"schedule {name!r} kept changing; try again")  # ABORTED (the base class: UNKNOWN)

    # -- the fire loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tenantflow-schedules")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._poke.clear()
            try:
                due = await asyncio.to_thread(
                    self._storage.claim_schedules, self._node, time.time(), LEASE_SECONDS, CLAIM_BATCH,
                    PER_TENANT, self._budget.exhausted(),
                )  # fmt: skip
                for s in due:  # round-robin by tenant, as claimed
                    if self._budget.take(s.tenant):
                        await self._fire_one(s)
                    else:
                        await self._defer(s)
            except Exception:
                log.exception("firing due schedules failed; retrying")
                due = []
            if len(due) < CLAIM_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), POLL_SECONDS)

    async def _fire_one(self, s: ScheduleRecord) -> None:
        now = time.time()
        assert s.next_fire is not None  # claim_schedules returns due ones only
        at = latest_fire(s.cron, s.time_zone, s.next_fire, now)
        missed = now - at > s.catchup_window
        passed = passed_over(s.cron, s.time_zone, s.next_fire, at)
        if passed:
            metrics.schedule_skipped(s.tenant, "late", passed)
            if passed >= COUNTED:
                log.info("schedule %s/%s: ~%d ticks from %s passed over (the kernel was down or busy, or the "
                         "tenant out of fire budget)", s.tenant, s.name, passed, fire_id(s.name, s.next_fire))  # fmt: skip
        fires, skipped, last_instance, error = s.fires, s.skipped + passed, s.last_instance, ""
        if missed and s.catchup == "skip":
            skipped += 1
            metrics.schedule_skipped(s.tenant, "catchup")
            log.info("schedule %s/%s: fire at %s missed (%.0f s late, past its catch-up window); skipped",
                     s.tenant, s.name, fire_id(s.name, at), now - at)  # fmt: skip
        elif s.overlap == "skip" and await self._live(s):
            skipped += 1
            metrics.schedule_skipped(s.tenant, "overlap")
        else:
            id = fire_id(s.name, at)
            try:
                await self._fire(s, id)
            except AlreadyExists:
                pass  # this fire was made before (a crash before this update, or another node)
            except TenantflowError as exc:  # e.g. its code was deleted, or a quota: said in Get
                error = f"fire {id}: {exc}"
                log.warning("schedule %s/%s could not fire: %s", s.tenant, s.name, exc)
                skipped += 1
                metrics.schedule_skipped(s.tenant, "error")
            if not error:
                fires, last_instance = fires + 1, id
                metrics.schedule_fired(s.tenant, now - at)
        done = dataclasses.replace(
            s, next_fire=next_fire(s.cron, s.time_zone, max(at, now)), last_fire=at, fires=fires,
            skipped=skipped, last_instance=last_instance, last_error=error, lease_owner=None,
            lease_until=None, updated_at=now,
        )  # fmt: skip
        if await asyncio.to_thread(self._storage.update_schedule, done) is None:
            log.info("schedule %s/%s changed while it fired (paused, resumed or deleted)", s.tenant, s.name)

    async def _defer(self, s: ScheduleRecord) -> None:
        """Out of fire budget: give the lease back, due as it was (fired later, or passed over)."""
        metrics.schedule_deferred(s.tenant)
        back = dataclasses.replace(s, lease_owner=None, lease_until=None)
        await asyncio.to_thread(self._storage.update_schedule, back)

    async def _live(self, s: ScheduleRecord) -> bool:
        if not s.last_instance:
            return False
        record = await asyncio.to_thread(self._storage.get_instance, s.tenant, s.last_instance)
        return record is not None and record.status not in TERMINAL
