"""Kernel limits a hostile tenant meets (issue 7, red-team F2, F3, F5).

- F2: steps that ask for a 30-day time-out cannot hold the dispatch slots: one tenant gets half of
  them by default, a step's time-out is capped by ``--max-step-timeout`` and no wake-up outlives
  max(``--wall-seconds``, ``--max-step-timeout``) plus its commit grace.
- F3: an instance cannot store more than ``--max-instance-state-mb`` of step outputs; Get of it
  still answers, and concurrent Gets keep the kernel's memory bounded.
- F5: concurrent large Publishes from many tenant names are bounded in bytes and fail fast; a
  small Publish of another tenant goes through meanwhile.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import BYSTANDER, bystander_completes

MiB = 1024 * 1024

HOLD = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Hold(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("hold", lambda: time.sleep(10**6), retries={"limit": 0}, timeout="30 days")
"""

CHAIN = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Chain(WorkflowEntrypoint):
    def run(self, event, step):
        for i in range(10):  # each step within its own capped time-out; together past the hard limit
            step.do(f"s{i}", lambda: time.sleep(3), retries={"limit": 0}, timeout="1 hour")
"""

BIG = """
from tenantflow.workflow import WorkflowEntrypoint

class Big(WorkflowEntrypoint):
    def run(self, event, step):
        for i in range(2):
            step.do(f"b{i}", lambda: "x" * 1_000_000)
        step.sleep("nap", 0.2)  # the next wake-up counts what the journal holds
        for i in range(2, 10):
            step.do(f"b{i}", lambda: "x" * 1_000_000)
        return "unreachable"
"""


def rss(pid: int) -> int:
    """Resident bytes of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match[1]) * 1024


class PeakRss:
    """Samples a process's RSS on a thread while in use; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def make_kernel(tmp_path: Path) -> Iterator[Callable[..., KernelProcess]]:
    """Start kernels with extra flags; all are stopped at the end."""
    started: list[KernelProcess] = []

    def make(*args: str) -> KernelProcess:
        k = KernelProcess(tmp_path / f"kernel{len(started)}", [*TEST_LIMITS, *args])
        started.append(k)
        k.start()
        return k

    yield make
    for k in started:
        k.stop()


def _pid(kernel: KernelProcess) -> int:
    assert kernel.proc is not None
    return kernel.proc.pid


def _step(inst: pb.Instance, name: str) -> pb.Step:
    return next(s for s in inst.steps if s.name == name)


def test_month_long_steps_do_not_hold_every_slot(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    kernel = make_kernel("--max-concurrent", "4", "--wall-seconds", "5", "--max-step-timeout", "5")
    with kernel.client() as client:
        ref = publish(client, tenant, HOLD)
        holders = client.create_batch(tenant, [{"workflow": "Hold", "code": ref}] * 8)
        time.sleep(1.0)  # the holders claim what they may
        took = bystander_completes(client, tenant, within=10.0)
        running = client.list(tenant, status=pb.STATUS_RUNNING).instances
        assert len(running) <= 2, f"one tenant runs {len(running)} of 4 slots; its fair share is 2"
        for holder in holders:
            done = client.wait(tenant, holder.id, timeout=90)
            assert done.status == pb.STATUS_ERRORED, done
            step = _step(done, "hold")
            assert step.error.name == "StepTimeout", step
            assert "did not finish within 5 s: the step asked for 2592000 s, capped to 5 s by the kernel's " \
                   "--max-step-timeout" in step.error.message, step.error.message  # fmt: skip
    print(f"bystander took {took:.2f} s beside 8 month-long holders")


def test_a_wake_up_never_outlives_its_hard_limit(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    # Each 3 s step fits its 4 s capped time-out and extends the wall limit by the commit grace, but
    # together they stop at max(2, 4) + 5 = 9 s.
    kernel = make_kernel("--wall-seconds", "2", "--max-step-timeout", "4")
    with kernel.client() as client:
        ref = publish(client, tenant, CHAIN)
        started = time.monotonic()
        inst = client.create(tenant, "Chain", ref)
        done = client.wait(tenant, inst.id, timeout=60)
        took = time.monotonic() - started
        assert done.status == pb.STATUS_ERRORED, done
        stopped = [s for s in done.steps if s.error.name == "StepTimeout"]
        assert len(stopped) == 1, done.steps
        assert "the wake-up reached its hard limit of 9 s" in stopped[0].error.message, stopped[
            0
        ].error.message
        assert took < 9 + 15, f"the wake-up took {took:.1f} s; its hard limit is 9 s"
        bystander_completes(client, tenant)


def test_instance_state_is_capped_and_get_stays_cheap(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    kernel = make_kernel("--max-instance-state-mb", "4")
    with kernel.client() as client:
        ref = publish(client, tenant, BIG)
        inst = client.create(tenant, "Big", ref)
        done = client.wait(tenant, inst.id, timeout=60)
        assert done.status == pb.STATUS_ERRORED, done
        assert "failed: InstanceStateLimit: " in done.error.message, done.error  # raised into run()
        failed = _step(done, "b4")  # 4 outputs of 1 MB fit in 4 MiB, the fifth does not
        assert failed.status == "failed" and failed.attempts == 1, failed  # not retried
        assert re.search(
            r"this instance has stored 3\.8 MiB of step outputs and this one adds 1\.0 MiB; the limit is 4 MiB "
            r"per instance \(the kernel's --max-instance-state-mb\)",
            failed.error.message,
        ), failed.error.message
        assert [s.name for s in done.steps if s.status == "complete"] == ["b0", "b1", "nap", "b2", "b3"]

        outcomes: list[str] = []

        def get() -> None:
            try:
                with Client(kernel.address) as c:
                    got = c.get(tenant, inst.id)
                    assert len(got.steps) == 6
                    outcomes.append("ok")
            except TenantflowRpcError as exc:  # the response budget may turn some away, fast and clearly
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "retry in a few seconds" in str(exc), exc
                outcomes.append("busy")

        with PeakRss(_pid(kernel)) as memory:
            for _ in range(3):
                threads = [threading.Thread(target=get) for _ in range(10)]
                for t in threads:
                    t.start()
                bystander_completes(client, tenant)
                for t in threads:
                    t.join(60)
        grew = memory.peak - memory.start
        print(
            f"30 Gets of a 4 MiB instance: {outcomes.count('ok')} answered, kernel RSS +{grew / MiB:.0f} MiB"
        )
        assert outcomes.count("ok") >= 3 and len(outcomes) == 30, outcomes
        assert grew < 300 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB under 10 concurrent Gets"


def test_large_publishes_are_bounded_and_a_small_one_goes_through(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    kernel = make_kernel()
    bomb = "X = [" + "1," * 4_500_000 + "]\n"  # 9 MB: under the 10 MiB code limit
    with kernel.client() as client:
        bystander_completes(client, f"{tenant}-warm", within=30)  # warm up sandboxes and the checker

        def attack(k: int) -> str:
            with Client(kernel.address) as c:
                try:
                    c.publish(f"{tenant[:40]}-bomber{k % 12}", "b", {"wf.py": bomb})
                    return "OK"
                except TenantflowRpcError as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in a few seconds" in str(
                        exc
                    ):
                        return "turned away"  # fast, before its bytes are queued
                    return exc.code.name  # its check ran (and found the bomb)

        with PeakRss(_pid(kernel)) as memory, ThreadPoolExecutor(24) as pool:
            attacks = [pool.submit(attack, k) for k in range(24)]  # 12 tenants x 2
            time.sleep(1.5)
            started = time.monotonic()
            publish(client, f"{tenant}-victim", BYSTANDER, name="tiny")
            victim = time.monotonic() - started
            took = bystander_completes(client, tenant, within=15)
            results = [a.result() for a in attacks]
        grew = memory.peak - memory.start
        print(f"victim Publish {victim:.2f} s, bystander {took:.2f} s, bombs {sorted(results)}, "
              f"kernel RSS +{grew / MiB:.0f} MiB")  # fmt: skip
        assert victim < 5.0, f"a tiny Publish took {victim:.2f} s beside 24 large ones"
        assert "DEADLINE_EXCEEDED" not in results, results  # the queue never outgrows a caller's deadline
        assert results.count("turned away") >= 8, results  # at most 64 MiB of them in flight
        assert grew < 750 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB"
