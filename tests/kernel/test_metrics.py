"""Prometheus metrics: scrape a live kernel started with --metrics-listen, parse the text format with
prometheus_client's own parser, and check the counters moved by exactly what the workflows did."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.metrics import TenantLabels, kill_reason
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

WORKFLOWS = """
import os
import time
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError

class Flaky(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("first", lambda: 1)
        def second(ctx):
            if ctx.attempt < 2:
                raise ConnectionError("try again")
            return 2
        return step.do("second", second, retries={"limit": 3, "delay": 0, "backoff": "constant"})

class Fails(WorkflowEntrypoint):
    def run(self, event, step):
        def refuse():
            raise NonRetryableError("no")
        step.do("refuse", refuse)

class Sleeps(WorkflowEntrypoint):
    def run(self, event, step):
        step.sleep("nap", 3600)

class Slow(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("slow", lambda: time.sleep(30), retries={"limit": 0}, timeout=0.5)

class Dies(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("die", lambda: os._exit(3), retries={"limit": 0})

class One(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: 1)
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(kernel: KernelProcess) -> str:
    line = next(line for line in kernel.lines if "metrics on " in line)
    return line.split("metrics on ")[1].split()[0]


RPCS = "tenantflow_rpc_handled_total"


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def scrape_until(url: str, ready: Callable[[Samples], bool]) -> Samples:
    """A scrape taken once ``ready`` holds (at most 10 s): a client sees its reply a moment before the
    server's interceptor records the call, so a scrape right after the call can miss it."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--metrics-listen", "127.0.0.1:0",
                                            "--tenant-max-live", "1", "--tenant-create-rate", "0.001", "--tenant-create-burst", "2"])  # fmt: skip
    k.start()
    yield k
    k.stop()


def test_scrape_counts_rpcs_steps_wakeups_and_instances(metered: KernelProcess) -> None:
    url = metrics_url(metered)
    with metered.client() as client:
        ids = {}
        for i, workflow in enumerate(("Flaky", "Fails", "Slow", "Dies")):
            tenant = f"t{i}"  # --tenant-max-live 1: one live instance per tenant
            ref = publish(client, tenant, WORKFLOWS)
            ids[workflow] = (tenant, client.create(tenant, workflow, ref).id)
        for tenant, id in ids.values():
            client.wait(tenant, id, timeout=60)
        sleeper = client.create("sleepy", "Sleeps", publish(client, "sleepy", WORKFLOWS)).id
        client.wait("sleepy", sleeper, frozenset({pb.STATUS_WAITING}))
        with pytest.raises(TenantflowRpcError, match="not found"):
            client.get("acme", "missing")
        before = scrape_until(url, lambda m: value(m, RPCS, method="Get", code="NOT_FOUND") >= 1)
        with pytest.raises(TenantflowRpcError, match="live"):  # the cap: 'sleepy' already has one live
            client.create("sleepy", "Sleeps", publish(client, "sleepy", WORKFLOWS, name="again"))
        with pytest.raises(TenantflowRpcError, match="per second"):  # its burst of 2 is spent
            client.create("sleepy", "Sleeps", publish(client, "sleepy", WORKFLOWS, name="again"))
        with pytest.raises(TenantflowRpcError, match="not found"):
            client.get("acme", "missing")
    after = scrape_until(url, lambda m: value(m, RPCS, method="Get", code="NOT_FOUND") >= 2)

    rpcs = RPCS
    assert value(before, rpcs, method="Create", code="OK") == 5
    assert value(before, rpcs, method="Get", code="NOT_FOUND") == 1
    assert value(after, rpcs, method="Get", code="NOT_FOUND") == 2
    assert value(after, rpcs, method="Create", code="RESOURCE_EXHAUSTED") == 2
    assert value(after, "tenantflow_rpc_duration_seconds_count", method="Create") == 7
    assert value(after, "tenantflow_quota_refusals_total", quota="max_live") == 1
    assert value(after, "tenantflow_quota_refusals_total", quota="create_rate") == 1
    assert "tenant" not in {k for (_, ls) in after for k, _ in ls}  # off by default

    # Flaky: first + second twice; Fails, Slow, Dies: one each.
    assert value(after, "tenantflow_step_attempts_total") == 6
    assert value(after, "tenantflow_step_failures_total") == 4
    assert value(after, "tenantflow_step_retries_total") == 1
    assert value(after, "tenantflow_step_duration_seconds_count", outcome="ok") == 2
    assert value(after, "tenantflow_step_duration_seconds_count", outcome="error") == 4
    wakeups = "tenantflow_wakeups_total"
    assert value(after, wakeups, outcome="complete") == 1
    assert value(after, wakeups, outcome="errored") == 3  # Fails, and Slow and Dies on their replay
    assert value(after, wakeups, outcome="timed_out") == 1
    assert value(after, wakeups, outcome="crashed") == 1
    assert value(after, wakeups, outcome="waiting") == 1
    kills = "tenantflow_sandbox_kills_total"
    assert value(after, kills, runtime="python", reason="timeout") == 1
    assert value(after, kills, runtime="python", reason="crash") == 1
    started = value(after, "tenantflow_sandbox_starts_total", runtime="python")
    assert (
        started
        == value(after, "tenantflow_wakeups_total")
        == value(after, "tenantflow_timer_lag_seconds_count")
    )
    assert value(after, "tenantflow_sandbox_cold_starts_total") == 0  # Create loaded the code already
    # every wake-up was leased by a claim or, for a Create this node could start at once, by the Create
    assert (
        value(after, "tenantflow_claim_batch_size_sum") + value(after, "tenantflow_started_at_create_total")
        == started
    )
    assert value(after, "tenantflow_started_at_create_total") > 0
    assert value(after, "tenantflow_commit_batch_size_count") > 0
    assert value(after, "tenantflow_commit_duration_seconds_count") == value(
        after, "tenantflow_commit_batch_size_count"
    )
    # Loaded once per (tenant, version) created: t0-t3, sleepy, sleepy's "again" (the same version twice).
    assert value(after, "tenantflow_code_cache_misses_total") == 6
    assert value(after, "tenantflow_code_cache_hits_total") >= started + 1
    assert value(after, "tenantflow_code_cache_entries") == 6

    assert value(before, "tenantflow_instances", status="complete") == 1
    assert value(before, "tenantflow_instances", status="errored") == 3
    assert value(before, "tenantflow_instances", status="waiting") == 1
    assert value(before, "tenantflow_instances_hibernating") == 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_tenant_labels_are_bounded(tmp_path: Path) -> None:
    """50 tenants, --metrics-tenant-labels 5: at most 5 tenants and 'other', and nothing is lost."""
    k = KernelProcess(
        tmp_path / "kernel", [*TEST_LIMITS, "--metrics-listen", "127.0.0.1:0", "--metrics-tenant-labels", "5"]
    )
    k.start()
    try:
        with k.client() as client:
            created = [
                (tenant, client.create(tenant, "One", publish(client, tenant, WORKFLOWS)).id)
                for tenant in (f"tenant-{i}" for i in range(50))
            ]
            for tenant, id in created:
                client.wait(tenant, id, timeout=60)
        families = ("tenantflow_step_attempts_total", "tenantflow_wakeups_total")
        # a wake-up is counted as it ends, a moment after its last commit is visible to the client
        samples = scrape_until(metrics_url(k), lambda m: all(value(m, f) >= 50 for f in families))
    finally:
        k.stop()
    for family in families:
        tenants = {dict(ls)["tenant"] for (n, ls) in samples if n == family}
        assert len(tenants) <= 6 and "other" in tenants, tenants
        assert value(samples, family) == 50


def test_labels_go_to_the_most_active_tenants() -> None:
    now = [0.0]
    labels = TenantLabels(2, interval=60, clock=lambda: now[0])
    demoted: list[str] = []
    labels.on_demote = demoted.append
    assert [labels.label(t) for t in ("a", "b", "c")] == ["a", "b", "other"]  # free labels go first
    for _ in range(5):
        labels.label("c")
    labels.label("a")
    now[0] = 61.0
    assert labels.label("c") == "c"  # re-ranked: c and a were busiest, b loses its label
    assert demoted == ["b"] and labels.labeled == {"a", "c"}
    assert labels.label("b") == "other"


def test_kill_reasons() -> None:
    assert kill_reason("", "", "") == ""
    assert kill_reason("CPU limit exceeded (3 s of CPU per step)", "", "") == "cpu"
    assert kill_reason("the module had grown to 64 MiB (memory limit: ...)", "", "") == "memory"
    assert kill_reason("the sandbox process crashed (SIGSEGV)", "", "") == "crash"
    assert kill_reason("stopped", "step time-out", "") == "timeout"
    assert kill_reason("stopped", "the wake-up ran longer than its 5 s wall-clock limit", "") == "wall"
    assert kill_reason("stopped", "", "terminated") == "stopped"


def test_bad_metrics_address_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--data-dir", str(tmp_path),
           "--metrics-listen", "nowhere"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "'nowhere' is not HOST:PORT" in proc.stderr


def test_a_create_starts_at_once_without_a_per_tenant_cap(tmp_path: Path) -> None:
    """``--max-running-per-tenant 0`` (no cap) must not turn off starting at Create, and an instance
    started so is written running: its timeline still reads created, then running."""
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--metrics-listen", "127.0.0.1:0",
                                            "--max-running-per-tenant", "0"])  # fmt: skip
    k.start()
    try:
        with Client(k.address) as client:
            ref = publish(client, "eager", WORKFLOWS)
            inst = client.create("eager", "One", ref)
            statuses = [e.status for e in client.watch("eager", inst.id, timeout=30) if e.kind == "status"]
            assert statuses[:2] == [pb.STATUS_QUEUED, pb.STATUS_RUNNING], statuses
            samples = scrape_until(
                metrics_url(k), lambda s: value(s, "tenantflow_started_at_create_total") >= 1
            )
            assert value(samples, "tenantflow_started_at_create_total") == 1
            assert value(samples, "tenantflow_claim_batch_size_sum") == 0
    finally:
        k.stop()
