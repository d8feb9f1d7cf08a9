"""Test a tenant's workflow without a kernel: ``tenantflow.testing``.

:class:`WorkflowTester` runs workflows through the real engine (the same step decisions, commits
and replays as a kernel) against a throwaway store, skipping durable time: a one-year sleep, a retry
back-off or a 24-hour event time-out passes at once, while work a step does (``time.sleep`` inside a
step) still takes its time. Events are scripted: each is delivered when the workflow first waits for
its type. ::

    from tenantflow.testing import Event, WorkflowTester

    def test_deploys_after_approval():
        with WorkflowTester("ci_pipeline/") as tester:
            run = tester.run("Pipeline", params={"repo": "acme/app"},
                             events=[Event("deploy-approval", {"approved": True, "by": "ana"})])
        assert run.status == "complete"
        assert run.step("test").attempts == 2
        assert run.step("test").errors == ["ConnectionError: test database not ready (flaky)"]

``runtime="in-process"`` (the default) runs the guest in the test's own process, fast and without
limits; ``runtime="python"`` or ``"python-wasm"`` runs it in that sandbox, as a kernel would.
:meth:`WorkflowTester.replay` replays a history exported with ``tenantflow history export`` on the
tester's code, and :meth:`WorkflowTester.replay_folder` a folder of them (one test per file).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tenantflow.kernel import historyfile
from tenantflow.kernel.devrun import LocalRun, Outcome, ScriptedEvent, files_of
from tenantflow.kernel.model import HistoryEntry, StepRecord
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.replay import ReplayReport
from tenantflow.testing._inprocess import InProcessPlugin

__all__ = ["Event", "ReplayReport", "StepResult", "WorkflowRun", "WorkflowTester"]
T = TypeVar("T")
Event = ScriptedEvent  # Event(type, payload): delivered when the workflow first waits for its type


@dataclass(frozen=True)
class StepResult:
    """One step as the run left it: its attempts, output, and every failed attempt's error."""

    name: str
    kind: str  # do | sleep | wait | create | wait_instance | undo | rollback
    status: str  # complete | failed | running | retrying | sleeping | waiting
    attempts: int
    output: Any
    error: str  # the last error ("Name: message"), "" if none
    # each failed attempt's error, in order (of every step of this name: the timeline names steps by name)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WorkflowRun:
    """How a run ended: status, output or error, its steps, its Watch history, the time skipped."""

    id: str
    status: str  # complete | errored | terminated | waiting | paused ...
    output: Any
    error: str  # "Name: message" for an errored run
    steps: list[StepResult]
    history: list[HistoryEntry]  # what Watch shows, oldest first
    skipped_seconds: float
    stuck: str  # why the run stopped before it ended ("" if it ended)

    def step(self, name: str, occurrence: int = 0) -> StepResult:
        """The ``occurrence``-th step called ``name`` (0: the first)."""
        found = [s for s in self.steps if s.name == name and s.kind not in ("undo", "rollback")]
        if occurrence >= len(found):
            raise KeyError(
                f"no step {name!r} (occurrence {occurrence}); steps: {[s.name for s in self.steps]}"
            )
        return found[occurrence]


def _step(record: StepRecord, history: list[HistoryEntry]) -> StepResult:
    errors = [h.message for h in history if h.kind == "step_failed" and h.step == record.name]
    return StepResult(
        name=record.name, kind=record.kind, status=record.status, attempts=record.attempts,
        output=json.loads(record.output_json) if record.output_json else None,
        error=f"{record.error_name}: {record.error_message}" if record.error_name else "", errors=errors,
    )  # fmt: skip


def _result(outcome: Outcome) -> WorkflowRun:
    r = outcome.record
    results = [_step(s, outcome.timeline) for s in sorted(outcome.steps, key=lambda s: s.seq)]
    return WorkflowRun(
        id=r.id, status=r.status.name.lower(), output=outcome.output,
        error=f"{r.error_name}: {r.error_message}" if r.error_name else "", steps=results,
        history=outcome.timeline, skipped_seconds=outcome.skipped_seconds, stuck=outcome.stuck,
    )  # fmt: skip


class WorkflowTester:
    """Runs one codebase's workflows locally; use it as a context manager (see the module docstring).

    ``path``: the workflow's ``.py`` file or a folder of them. ``runtime``: ``"in-process"``
    (default), ``"python"`` or ``"python-wasm"``. ``real_time``: do not skip durable time.
    ``secrets``: what the steps' ``ctx.secrets`` holds, by name."""

    def __init__(
        self,
        path: str | Path,
        *,
        runtime: str = "in-process",
        real_time: bool = False,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.runtime = runtime
        self._files = files_of(self.path)
        plugins = Plugins(extra=[InProcessPlugin()]) if runtime == "in-process" else None
        self._local = LocalRun(real_time=real_time, plugins=plugins, secrets=secrets)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tenantflow-testing", daemon=True)
        self._ref = ""

    def _do(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def __enter__(self) -> WorkflowTester:
        self._thread.start()
        self._do(self._local.__aenter__())
        runtime = "python" if self.runtime == "in-process" else self.runtime
        self._ref = self._do(self._local.publish(self._files, runtime=runtime))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._do(self._local.__aexit__(kind, exc, tb))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def run(
        self, workflow: str, params: Any = None, events: Sequence[ScriptedEvent] = (), timeout: float = 120.0
    ) -> WorkflowRun:
        """Run ``workflow`` with ``params`` until it ends (or cannot go on); return how it went."""

        async def go() -> Outcome:
            record = await self._local.start(workflow, self._ref, params)
            return await self._local.drive(record.id, events, timeout=timeout)

        return _result(self._do(go()))

    def replay(self, history: str | Path) -> ReplayReport:
        """Replay a history file (``tenantflow history export``) on this code, without side effects."""
        recorded = historyfile.parse(Path(history).read_text())
        return self._do(self._local.replay(recorded, self._ref))

    def replay_folder(self, folder: str | Path) -> dict[str, ReplayReport]:
        """Replay every ``*.json`` history in ``folder``; the reports by file name."""
        return {p.name: self.replay(p) for p in sorted(Path(folder).glob("*.json"))}
