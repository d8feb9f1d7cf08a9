"""Memory a run creates outside its address space counts against its limit (issue 16).

With a writable directory granted, RLIMIT_FSIZE is 256 MiB (not 0), so a run can grow memfds and
tmpfs files: shared memory RLIMIT_AS never sees (a step held 1,000 MiB in memfds under a 512 MiB
limit). The run's memory cgroup counts them: the step fails with the memory limit, the host's
shared memory never grows past one run's limit, and another tenant completes on time. Where no
memory cgroup can be made, memfd_create is refused instead.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes

LIMIT_MIB = 256  # TEST_LIMITS' --memory-mb
HOARD_MIB = 1000

HOARDER = """
import os
from tenantflow.workflow import WorkflowEntrypoint

CHUNK = b"x" * (1 << 20)


def fill(fd, mib):
    for _ in range(mib):
        os.write(fd, CHUNK)


def hoard(kind, where, total):
    held = []  # kept open: the pages stay until the run ends
    try:
        while len(held) * 64 < total:
            if kind == "memfd":
                fd = os.memfd_create(f"hoard{len(held)}")
            else:
                fd = os.open(os.path.join(where, f"hoard{len(held)}"), os.O_CREAT | os.O_RDWR, 0o600)
            held.append(fd)
            fill(fd, 64)
    except OSError as exc:
        return ["refused", exc.errno, len(held) * 64]
    return ["held", len(held) * 64]


class Hoarder(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        return await step.do("hoard", lambda: hoard(p["kind"], p["where"], p["mib"]), retries={"limit": 0})
"""


def shared_memory_mib() -> float:
    """The host's shared memory (memfd, tmpfs, /dev/shm) in MiB, as /proc/meminfo says."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


@pytest.fixture
def tmpfs_grant() -> Iterator[Path]:
    """A granted directory on tmpfs (/dev/shm), writable by whatever uid tenant code runs as."""
    if not Path("/dev/shm").is_dir() or not any(
        line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in Path("/proc/mounts").read_text().splitlines()
    ):
        pytest.skip("/dev/shm is not a tmpfs here")
    grant = Path("/dev/shm") / f"tenantflow-test-{uuid.uuid4().hex[:8]}"
    grant.mkdir()
    grant.chmod(0o777)
    yield grant
    shutil.rmtree(grant, ignore_errors=True)


@pytest.fixture
def grant(tmpfs_grant: Path) -> Path:
    return tmpfs_grant


@pytest.fixture
def hoard_kernel(tmp_path: Path, grant: Path) -> Iterator[KernelProcess]:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(grant)])
    kernel.start()
    yield kernel
    kernel.stop()


def memory_cgroup(kernel: KernelProcess) -> bool:
    return not any("no memory cgroup" in line or "memory cgroup could not" in line for line in kernel.lines)


def hoard(kernel: KernelProcess, tenant: str, kind: str, where: Path) -> tuple[pb.Instance, float]:
    """Run the hoarding step with a bystander meanwhile; the instance and the host's peak growth of
    shared memory (MiB) while it ran."""
    base, peak, stop = shared_memory_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], shared_memory_mib() - base)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with kernel.client() as client:
            ref = publish(client, tenant, HOARDER)
            inst = client.create(
                tenant, "Hoarder", ref, params={"kind": kind, "where": str(where), "mib": HOARD_MIB}
            )
            bystander_completes(client, tenant)
            done = client.wait(tenant, inst.id, timeout=60)
    finally:
        stop.set()
        sampler.join()
    return done, peak[0]


def test_memfds_past_the_memory_limit_fail_their_step(
    hoard_kernel: KernelProcess, grant: Path, tenant: str
) -> None:
    done, grown = hoard(hoard_kernel, tenant, "memfd", grant)
    if memory_cgroup(hoard_kernel):
        assert done.status == pb.STATUS_ERRORED, done
        step = done.steps[0]
        assert step.status == "failed", step
        assert f"memory limit exceeded ({LIMIT_MIB} MiB per run" in step.error.message, step.error.message
    else:  # no cgroup counts them: memfd_create is refused
        assert done.status == pb.STATUS_COMPLETE, done
        assert Client.output(done)[:2] == ["refused", errno.EPERM], Client.output(done)
    assert grown < LIMIT_MIB + 64, f"host shared memory grew {grown:.0f} MiB under a {LIMIT_MIB} MiB limit"
    assert hoard_kernel.proc is not None and hoard_kernel.proc.poll() is None


def test_tmpfs_files_in_a_grant_count_against_the_memory_limit(
    hoard_kernel: KernelProcess, grant: Path, tenant: str
) -> None:
    if not memory_cgroup(hoard_kernel):
        pytest.skip("no memory cgroup here: files on a tmpfs grant are bounded only by the tmpfs's size")
    done, grown = hoard(hoard_kernel, tenant, "file", grant)
    assert done.status == pb.STATUS_ERRORED, done
    assert f"memory limit exceeded ({LIMIT_MIB} MiB per run" in done.steps[0].error.message, done.steps[0]
    assert grown < LIMIT_MIB + 64, f"host shared memory grew {grown:.0f} MiB under a {LIMIT_MIB} MiB limit"
