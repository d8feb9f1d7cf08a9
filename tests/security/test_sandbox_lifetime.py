"""Issue 7 finding 9: sandbox processes never outlive their kernel.

Every template dies with the kernel thread that started it, and every run with its template
(parent-death SIGKILL, checked after fork against the race), so a killed kernel's old attempt
can never write after it, nor overlap the retry of a new kernel.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")

LATE_WRITER = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class LateWriter(WorkflowEntrypoint):
    async def run(self, event, step):
        def slow():
            time.sleep(4)
            with open(event.payload["path"], "w") as f:
                f.write("written after the kernel died")
            return "written"
        return await step.do("slow", slow, retries={"limit": 0})
"""


def sandbox_processes(kernel_pid: int) -> list[int]:
    """Templates and runs started by that kernel: their command line carries its pid."""
    marker = f"tenantflow-kernel={kernel_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"sandbox_subprocess.zygote" in cmdline and marker in cmdline:
                found.append(int(entry.name))
    return found


def gone_within(kernel_pid: int, limit: float) -> float:
    """Seconds until no sandbox process of that (killed) kernel remains; fails past ``limit``."""
    killed = time.monotonic()
    while left := sandbox_processes(kernel_pid):
        assert time.monotonic() - killed < limit, f"sandbox processes {left} outlived their kernel"
        time.sleep(0.005)
    return time.monotonic() - killed


def test_sandbox_processes_die_with_a_killed_kernel(tmp_path: Path, tenant: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # tenant code runs as another uid than the test
    target = out / "late.txt"
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(out)])
    kernel.start()
    try:
        assert kernel.proc is not None
        pid = kernel.proc.pid
        with kernel.client() as client:
            ref = publish(client, tenant, LATE_WRITER)
            client.create(tenant, "LateWriter", ref, params={"path": str(target)})
            started = time.monotonic()
            deadline = started + 20
            while len(sandbox_processes(pid)) < 2:  # the template and the run
                assert time.monotonic() < deadline, "the run never started"
                time.sleep(0.02)
            started = time.monotonic()
            bystander_completes(client, tenant)  # the sleeping step holds nobody else up
            time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
        kernel.kill()
        gone_within(pid, 1.0)
        time.sleep(4.5 - (time.monotonic() - started))  # past the moment the step would have written
        assert not target.exists(), "a step wrote after its kernel was killed"
        assert not any("BrokenPipeError" in line or "Traceback" in line for line in kernel.lines), (
            kernel.lines
        )
    finally:
        kernel.stop()


def test_a_restarted_kernel_retries_without_overlap(tmp_path: Path, tenant: str) -> None:
    """The new kernel's attempt is the only one that writes."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # tenant code runs as another uid than the test
    target = out / "late.txt"
    args = [*TEST_LIMITS, "--sandbox-writable-dir", str(out)]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    assert kernel.proc is not None
    with kernel.client() as client:
        ref = publish(client, tenant, LATE_WRITER)
        inst = client.create(tenant, "LateWriter", ref, params={"path": str(target)})
        deadline = time.monotonic() + 20
        while len(sandbox_processes(kernel.proc.pid)) < 2:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.02)
    time.sleep(1.0)
    kernel.kill()
    gone_within(kernel.proc.pid, 1.0)
    kernel.start()
    try:
        with kernel.client() as client:
            done = client.wait(tenant, inst.id, timeout=90)
            assert done.status == pb.STATUS_COMPLETE and Client.output(done) == "written", done
            assert target.read_text() == "written after the kernel died"
    finally:
        kernel.stop()
