"""Local runs: a workflow through the real engine, against a throwaway store, with time skipped.

``tenantflow dev run`` and the tenants' test kit (``tenantflow.testing``) drive a
:class:`~tenantflow.kernel.service.Kernel` that runs nothing by itself: the driver claims what is
due on a clock it owns and runs each wake-up in the same sandbox a kernel would use, delivers
scripted events when a workflow first waits for their type, and, unless real time is asked for,
moves the clock to the next timer when nothing is due, so a one-year sleep passes at once. Work a
step does (``time.sleep`` inside a step) is real and is not skipped; durable time (sleeps, retry
back-offs, event time-outs) is.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from tenantflow.kernel import secretbox, tenantdata
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.historyfile import RecordedHistory
from tenantflow.kernel.model import TERMINAL, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.replay import ReplayReport, replay
from tenantflow.kernel.service import CreateSpec, Kernel

TENANT = "dev"
NODE = "dev"


class SkippingClock:
    """Wall-clock time plus the durable time skipped so far."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped

    def skip_to(self, when: float) -> None:
        self.skipped += max(0.0, when - self())


@dataclass(frozen=True)
class ScriptedEvent:
    """An event delivered when a workflow first waits for its ``type``."""

    type: str
    payload: object = None


@dataclass
class Outcome:
    """How a local run ended: the instance, its steps and its timeline, and the time skipped."""

    record: InstanceRecord
    steps: list[StepRecord]
    timeline: list[HistoryEntry]
    skipped_seconds: float
    stuck: str = ""  # why the run could not go on ("" once it ended)
    undelivered: list[ScriptedEvent] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.record.status in TERMINAL

    @property
    def output(self) -> object:
        return json.loads(self.record.output_json) if self.record.output_json else None


def _is_code(relative: Path) -> bool:
    """Whether a file under a workflow's folder is its code: not hidden, cached, or a test of it
    (``tests/``, ``test_*.py``, ``*_test.py``, ``conftest.py``), which stays on the author's machine."""
    *folders, name = relative.parts
    if name.startswith(".") or any(
        p.startswith(".") or p in ("__pycache__", "tests", "test") for p in folders
    ):
        return False
    return not (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py")


def files_of(path: Path) -> dict[str, bytes]:
    """A workflow file, or the ``.py`` files under a directory (its tests left out), as Publish takes them."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if path.is_dir():
        found = {
            p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*.py"))
            if _is_code(p.relative_to(path))
        }
        if found:
            return found
        raise ValueError(f"{path} holds no .py files")
    raise ValueError(f"{path} does not exist")


class LocalRun:
    """A kernel of one's own over a throwaway SQLite store, driven by :meth:`drive`.

    ``real_time``: sleeps and time-outs take their real time instead of being skipped. ``secrets``:
    what ``ctx.secrets`` holds (sealed with a throwaway key, as a kernel keeps them)."""

    def __init__(
        self,
        *,
        real_time: bool = False,
        plugins: Plugins | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.real_time = real_time
        self.clock = SkippingClock()
        self._plugins = plugins
        self._secrets = dict(secrets or {})
        self._dir: Path | None = None
        self.kernel: Kernel

    async def __aenter__(self) -> LocalRun:
        self._dir = Path(tempfile.mkdtemp(prefix="tenantflow-dev-"))
        config = KernelConfig(data_dir=self._dir, node_id=NODE, retention_seconds=0)
        if self._secrets:
            (self._dir / "secrets.key").write_text(secretbox.new_key() + "\n")
            config.secrets_key_file = str(self._dir / "secrets.key")
        self.kernel = Kernel(config, self._plugins, clock=self.clock)
        try:
            await self.kernel.start(dispatch=False)
            for name, value in self._secrets.items():
                await tenantdata.secret_put(self.kernel.storage, config, TENANT, name, value)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kernel.stop()
            # let what the kernel left running (a sandbox cleaning up after its last run) finish
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=10)
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    async def publish(self, files: dict[str, bytes], runtime: str = "python", name: str = "dev") -> str:
        """Publish the workflow's files (checked as a kernel checks them); return the pinned ref."""
        return (await self.kernel.publish(TENANT, name, runtime, files, None)).ref

    async def start(self, workflow: str, ref: str, params: object = None, id: str = "") -> InstanceRecord:
        spec = CreateSpec(workflow=workflow, code=ref, id=id, params_json=json.dumps(params))
        return await self.kernel.create(TENANT, spec)

    async def replay(self, history: RecordedHistory, ref: str) -> ReplayReport:
        """Replay an exported history on ``ref`` (code this run published), without side effects."""
        k = self.kernel
        record = replace(history.record, tenant=TENANT)
        return await replay(record, history.steps, history.events, ref, catalog=k.catalog, config=k.config,
                            plugins=k.plugins)  # fmt: skip

    async def drive(
        self,
        id: str,
        events: Sequence[ScriptedEvent] = (),
        on_entry: Callable[[HistoryEntry], None] | None = None,
        timeout: float = 600.0,
    ) -> Outcome:
        """Run instance ``id`` (and the children it starts) until it ends, or until it cannot go on
        (it waits for an event nobody will send, or is paused), or ``timeout`` seconds of real time."""
        kernel, storage = self.kernel, self.kernel.storage
        pending = list(events)
        timeline: list[HistoryEntry] = []  # read as it grows, each entry once
        stuck = ""
        give_up = time.monotonic() + timeout

        async def emit() -> None:
            while entries := await kernel.history(TENANT, id, timeline[-1].seq if timeline else 0):
                timeline.extend(entries)
                if on_entry is not None:
                    for entry in entries:
                        on_entry(entry)

        while True:
            await self._deliver(pending)
            due = await asyncio.to_thread(
                storage.claim,
                NODE,
                self.clock(),
                kernel.config.lease_seconds,
                kernel.config.max_concurrent_runs,
            )
            if due:
                await asyncio.gather(*(kernel.engine.execute(record) for record in due))
                await emit()
                continue
            await emit()
            record = (await kernel.get(TENANT, id)).record
            if record.status in TERMINAL:
                break
            if record.status == Status.PAUSED:
                stuck = "the instance is paused"
                break
            if time.monotonic() >= give_up:
                stuck = f"the run did not end within {timeout:g} s"
                break
            next_at = await asyncio.to_thread(storage.next_run_at)
            if next_at is None:
                waits = await self._waits()
                types = sorted({t for ts in waits.values() for t in ts})
                stuck = (
                    f"the workflow waits for an event of type {', '.join(map(repr, types))} that no scripted event supplies"
                    if types
                    else "nothing is due and nothing can wake the instance"
                )
                break
            if self.real_time:
                await asyncio.sleep(min(max(next_at - self.clock(), 0.0), 0.5))
            else:
                self.clock.skip_to(next_at)
        view = await kernel.get(TENANT, id)  # every way out of the loop passed emit(): the timeline is whole
        return Outcome(view.record, view.steps, timeline, self.clock.skipped, stuck, pending)

    async def _waits(self) -> dict[str, set[str]]:
        """The event types each waiting instance of the run waits for, by instance id."""
        storage = self.kernel.storage
        waits: dict[str, set[str]] = {}
        cursor: str | None = None
        while True:
            page, cursor = await asyncio.to_thread(
                storage.list_instances, TENANT, Status.WAITING, cursor, 100
            )
            for record in page:
                steps = await asyncio.to_thread(storage.get_steps, TENANT, record.id)
                types = {s.event_type for s in steps if s.status == "waiting" and s.kind == "wait"}
                if types:
                    waits[record.id] = types
            if cursor is None:
                return waits

    async def _deliver(self, pending: list[ScriptedEvent]) -> None:
        """Send each scripted event to the first instance waiting for its type, in script order."""
        if not pending:
            return
        for id, types in (await self._waits()).items():
            for event in list(pending):
                if event.type in types:
                    pending.remove(event)
                    types.discard(event.type)
                    await self.kernel.send_event(TENANT, id, event.type, json.dumps(event.payload))
