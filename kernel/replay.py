"""Replay a recorded journal against other code, without side effects, and say what the kernel would.

The journal (and the instance's unread events) is copied into a scratch store of its own, and one
wake-up runs the other code on it in the same sandbox a kernel would use, with the wake-up in replay
mode (:class:`~tenantflow.kernel.wakeup.WakeUp`): the guest replays every step the journal settles
from the journal itself, and the first step it does not settle is neither decided nor run, so no step
callback runs and nothing outside the scratch store changes. The workflow code outside steps does run
(it must be deterministic; that is what is checked). A journal the code does not follow ends the
wake-up with the guest's ``NonDeterminismError``, naming the step recorded and the step asked for.

``tenantflow dev replay`` replays an exported history on a local file; Upgrade replays each live
instance on the code it would move to.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.journal import Stop
from tenantflow.kernel.logbudget import TenantLogRate
from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.wakeup import WakeUp

_RECORDED = re.compile(r"recorded step '([^']*)'|step '([^']*)' \(occurrence \d+\) was recorded")


@dataclass(frozen=True)
class ReplayReport:
    """What replaying a journal on other code showed."""

    verdict: str  # clean | diverged | errored
    message: str  # for people: what happened, naming steps
    replayed: int  # steps the journal settled
    step: str = ""  # diverged: the step the journal recorded where the code asked for another
    stopped_at: str = ""  # clean: the first step the journal does not settle (where a live run goes on)
    status: Status = Status.RUNNING  # the status the instance would have after the wake-up

    @property
    def clean(self) -> bool:
        return self.verdict == "clean"


async def _no_children(*_: object) -> InstanceRecord:
    raise AssertionError("a replay starts no child: create steps it does not settle are not run")


async def replay(
    record: InstanceRecord,
    steps: list[StepRecord],
    events: list[EventRecord],
    code: str,
    *,
    catalog: CodeCatalog,
    config: KernelConfig,
    plugins: Plugins,
) -> ReplayReport:
    """Replay ``steps`` (the journal of ``record``) and the unread ``events`` on ``code`` (a pinned
    ref of ``record``'s tenant, loaded through ``catalog``)."""
    scratch = Path(tempfile.mkdtemp(prefix="tenantflow-replay-"))
    storage = plugins.storage(f"sqlite:///{scratch / 'replay.sqlite3'}", config)
    committer = Committer(storage, lambda _: None)
    committer.start()
    try:
        now = time.time()
        copy = replace(
            record, code=code, status=Status.RUNNING, run_at=now, generation=0, lease_owner=config.node_id,
            lease_until=now + 3600, output_json="", error_name="", error_message="",
        )  # fmt: skip
        unread = [replace(e, seq=0, consumed_by="") for e in events if not e.consumed_by]
        await asyncio.to_thread(
            storage.create_instances,
            [copy],
            [HistoryEntry(kind="status", at=now, status=int(Status.RUNNING))],
        )
        if steps or unread:
            change = Change(tenant=copy.tenant, id=copy.id, now=now, steps=list(steps), add_events=unread)
            (result,) = await asyncio.to_thread(storage.apply, [change])
            if not result.ok:
                raise RuntimeError(f"the journal could not be copied for the replay: {result.reason}")
        wake = WakeUp(
            copy, config=config, storage=storage, committer=committer, catalog=catalog,
            log_rate=TenantLogRate(0, 0), spawn=_no_children, fresh=False, replay=True,
        )  # fmt: skip
        try:
            await wake.execute()
        except Stop:
            pass
        after = await asyncio.to_thread(storage.get_instance, copy.tenant, copy.id)
        assert after is not None
        return _report(record, after, steps, wake.replay_stopped_at)
    finally:
        await committer.stop()
        storage.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _report(
    recorded: InstanceRecord, after: InstanceRecord, steps: list[StepRecord], stopped: tuple[str, str] | None
) -> ReplayReport:
    settled = sum(1 for s in steps if s.status in ("complete", "failed"))
    if after.status == Status.ERRORED and after.error_name == "NonDeterminismError":
        match = _RECORDED.search(after.error_message)
        step = next((g for g in match.groups() if g), "") if match else ""
        return ReplayReport("diverged", after.error_message, settled, step=step, status=after.status)
    if after.status == Status.ERRORED and (after.error_name, after.error_message) == (
        recorded.error_name,
        recorded.error_message,
    ):
        return ReplayReport(
            "clean", f"replays the journal's {settled} settled step(s) and ends errored as recorded "
            f"({after.error_name}: {after.error_message})", settled, status=after.status,
        )  # fmt: skip
    if after.status == Status.ERRORED:
        return ReplayReport(
            "errored", f"the code fails where the journal goes on: {after.error_name}: {after.error_message}",
            settled, status=after.status,
        )  # fmt: skip
    if after.status == Status.COMPLETE:
        return ReplayReport("clean", f"replays the journal's {settled} settled step(s); run() returns", settled,
                            status=after.status)  # fmt: skip
    where = f"{stopped[0]} ({stopped[1]})" if stopped else ""
    tail = f"; it would go on at step {where}" if where else ""
    return ReplayReport(
        "clean",
        f"replays the journal's {settled} settled step(s){tail}",
        settled,
        stopped_at=where,
        status=after.status,
    )
