"""Per-tenant creation-rate limit: a token bucket per tenant, answered with ``RESOURCE_EXHAUSTED``
and how long to wait. Buckets that have refilled are forgotten, so idle tenants cost nothing.
The limit is per kernel process; the live-instance cap (``tenant_max_live``) is enforced by
storage, in the creating transaction, across every kernel sharing it."""

from __future__ import annotations

import time

from tenantflow.kernel import metrics
from tenantflow.kernel.errors import ResourceExhausted

SWEEP_AT = 10_000  # buckets held before the refilled ones are forgotten


class CreationRate:
    """``rate`` creations per second per tenant, with bursts up to ``burst`` (``rate`` 0: no limit)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._sweep_at = SWEEP_AT

    def take(self, tenant: str, count: int, now: float | None = None) -> None:
        """Spend ``count`` creations of ``tenant``'s budget, or raise saying when to retry."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(tenant, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if count > tokens:
            wait = (count - tokens) / self.rate
            metrics.quota_refused(tenant, "create_rate")
            raise ResourceExhausted(
                f"tenant {tenant!r} may create {self.rate:g} instances per second (bursts of "
                f"{self.burst:g}); try again in {wait:.2f} s"
                + ("" if count <= self.burst else f" with at most {self.burst:g} at once")
            )
        self._buckets[tenant] = (tokens - count, now)
        if len(self._buckets) > self._sweep_at:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        self._buckets = {
            t: (tokens, at)
            for t, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate < self.burst
        }
        # Many tenants still refilling: sweep again only once as many more arrive (amortised O(1)).
        self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)
