"""What makes a run start fast keeps it as confined (the prebuilt run filter, spare processes), and a
new step runs ahead of its grant only when the job allows it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tenantflow.kernel.sandbox import Limits
from tenantflow.plugins.sandbox_subprocess import policy, syscalls
from tenantflow.plugins.sandbox_subprocess.sandbox import SubprocessSandbox
from tenantflow.plugins.sandbox_subprocess.spares import SPARES

pyseccomp = pytest.importorskip("pyseccomp")


@pytest.mark.parametrize("pid", [1, 4242, 4_194_304])
def test_patched_run_filter_is_the_one_libseccomp_builds(pid: int) -> None:
    policy._prepare_run_filter(pyseccomp)
    assert policy._run_filter is not None, "the run filter could not be prebuilt"
    built = policy.export_bpf(syscalls.build_run_filter(pyseccomp, pid))
    assert policy.run_filter_program(pid) == built


CODE = """
import os
from tenantflow.workflow import WorkflowEntrypoint

class Who(WorkflowEntrypoint):
    def run(self, event, step):
        def look():
            try:
                os.kill(1, 0)
                signal = "allowed"
            except PermissionError:
                signal = "EPERM"
            try:
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                fork = "allowed"
            except PermissionError:
                fork = "EPERM"
            return {"pid": os.getpid(), "signal": signal, "fork": fork}
        return step.do("look", look)
"""


class _Host:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def admit(self, size: int) -> bool:
        return True

    async def notify(self, message: dict[str, Any]) -> None:
        pass

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(message)
        if message["op"] == "step":
            return {"do": "run", "attempt": 1}
        if message["op"] == "result":
            return {"do": "return", "value": message.get("value")}
        return {"do": "ack"}


def _job() -> dict[str, Any]:
    return {"files": {"who.py": CODE.encode()}, "module": "who", "workflow": "Who", "journal": [],
            "event": {"payload": None, "instance_id": "i", "timestamp": "2026-01-01T00:00:00+00:00"}}  # fmt: skip


def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
    return found


def test_runs_take_confined_spares_and_spares_are_bounded() -> None:
    async def main() -> None:
        sandbox = SubprocessSandbox(unsafe_allow_weak=True)
        await sandbox.start()
        try:
            limits = Limits(cpu_seconds=5, wall_seconds=30)
            results = []
            for _ in range(SPARES + 3):
                host = _Host()
                exit_ = await sandbox.run(_job(), host, limits)
                assert not exit_.crashed, exit_.detail
                result = next(m for m in host.seen if m["op"] == "result")
                assert result["ok"], result.get("error")
                results.append(result["value"])
            for value in results:  # every run, spare or not, has the run filter (the template's allows both)
                assert value["signal"] == "EPERM" and value["fork"] == "EPERM"
            assert len({value["pid"] for value in results}) == len(results)
            await asyncio.sleep(0.5)
            assert sandbox._proc is not None
            waiting = _children(sandbox._proc.pid)
            assert sorted(waiting.values()) == ["tf-spare"] * SPARES, waiting
            assert not set(waiting) & {value["pid"] for value in results}
        finally:
            await sandbox.close()
        assert sandbox._proc is None

    asyncio.run(main())


TIMED = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Timed(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("when", time.time)
"""


class _SlowGrant(_Host):
    """Holds a step's reply back 0.2 s, and notes when it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.granted_at = 0.0

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        reply = await super().call(message)
        if message["op"] == "step":
            await asyncio.sleep(0.2)
            self.granted_at = time.time()
        return reply


@pytest.mark.parametrize("granted", [True, False])
def test_a_new_step_runs_ahead_only_when_the_job_grants_it(granted: bool) -> None:
    async def main() -> _SlowGrant:
        sandbox = SubprocessSandbox(unsafe_allow_weak=True)
        await sandbox.start()
        try:
            host = _SlowGrant()
            job = {**_job(), "files": {"timed.py": TIMED.encode()}, "module": "timed", "workflow": "Timed"}
            exit_ = await sandbox.run({**job, "ahead": granted}, host, Limits(cpu_seconds=5, wall_seconds=30))
            assert not exit_.crashed, exit_.detail
            return host
        finally:
            await sandbox.close()

    host = asyncio.run(main())
    step, result = host.seen[0], host.seen[1]
    assert (step["op"], step.get("ahead", False), result["op"], result["attempt"]) == (
        "step",
        granted,
        "result",
        1,
    )
    # running ahead, the callback ran before the grant was sent; asking first, after it arrived
    assert (result["value"] < host.granted_at) is granted, (result["value"], host.granted_at)
