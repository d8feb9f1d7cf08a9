"""Per-tenant quotas: a creation rate (token bucket) and a cap on live instances."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tenantflow.client import TenantflowRpcError
from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.quotas import CreationRate
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish


def test_the_bucket_refills_at_the_rate_and_forgets_idle_tenants() -> None:
    rate = CreationRate(rate=2.0, burst=4)
    rate.take("a", 4, now=0.0)
    with pytest.raises(
        ResourceExhausted, match=r"2 instances per second \(bursts of 4\); try again in 0.50 s"
    ):
        rate.take("a", 1, now=0.0)
    rate.take("b", 4, now=0.0)  # tenants have their own buckets
    rate.take("a", 1, now=0.5)
    with pytest.raises(ResourceExhausted, match="with at most 4 at once"):
        rate.take("a", 5, now=100.0)
    rate._forget_full(now=100.0)
    assert len(rate) == 0
    CreationRate(rate=0, burst=1).take("a", 10**6)  # 0: no limit


SLEEPER = """
from tenantflow.workflow import WorkflowEntrypoint

class Sleeper(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("nap", "1 hour")
"""


def test_quotas_answer_resource_exhausted_and_touch_one_tenant(tmp_path: Path, tenant: str) -> None:
    args = ["--tenant-create-rate", "0.01", "--tenant-create-burst", "8", "--tenant-max-live", "6"]
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, *args])
    kernel.start()
    try:
        with kernel.client() as client:
            ref = publish(client, tenant, SLEEPER)
            made = client.create_batch(tenant, [{"workflow": "Sleeper", "code": ref}] * 6)
            with pytest.raises(TenantflowRpcError) as err:
                client.create(tenant, "Sleeper", ref)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "has 6 live instances and the limit is 6" in err.value.message
            other = tenant + "-other"  # its own quota
            client.create(other, "Sleeper", publish(client, other, SLEEPER))
            client.terminate(tenant, made[0].id)
            client.create(tenant, "Sleeper", ref)  # a slot freed up
            with pytest.raises(TenantflowRpcError) as err:
                client.create_batch(tenant, [{"workflow": "Sleeper", "code": ref}] * 3)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "0.01 instances per second" in err.value.message and "try again in" in err.value.message
    finally:
        kernel.stop()


def test_many_refilling_tenants_are_swept_rarely_not_on_every_take() -> None:
    """Past 10,000 tenants whose buckets are still refilling, a sweep used to run on every take
    (quadratic under a storm of new tenants); now it runs again only when the map has doubled."""
    rate = CreationRate(rate=0.001, burst=2)
    sweeps = 0
    sweep = rate._forget_full

    def counted(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        sweep(now)

    rate._forget_full = counted  # type: ignore[method-assign]
    for i in range(50_000):
        rate.take(f"tenant-{i}", 1, now=0.0)  # none refills: every bucket is kept
    assert len(rate) == 50_000
    assert sweeps <= 4, sweeps  # at 10k, 20k, 40k (was 40,000 sweeps)
    rate.take("late", 1, now=10_000.0)  # once they have refilled, the next sweep forgets them
    rate._forget_full(10_000.0)
    assert len(rate) <= 1
