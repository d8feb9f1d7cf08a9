"""Per-tenant bounds on schedules: how many a tenant may have, how often one may fire, and how many
fires per second a tenant gets across all of its schedules (a token bucket per tenant, per kernel).

What happens to a fire past the rate (the rule the README states): it is **deferred**, not lost.
The schedule stays due and fires once its tenant has budget again, at the latest tick due by then
(so a late fire keeps a tick's id); ticks passed over meanwhile are counted as skipped (in the
schedule's ``skipped_fires`` and ``tenantflow_schedule_fires_skipped_total{reason="late"}``). A
fire deferred past the schedule's catch-up window follows its catch-up policy, as after downtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

SWEEP_AT = 10_000  # buckets held before the refilled ones are forgotten


@dataclass(frozen=True)
class ScheduleLimits:
    """``tenantflow serve``'s schedule flags (0: no bound)."""

    max_per_tenant: int = 1000  # schedules of one tenant, paused ones included
    fire_rate: float = 10.0  # fires per second of one tenant across its schedules
    fire_burst: float = 100.0  # ... in bursts of up to this many
    min_interval: float = 1.0  # seconds between two fires of one schedule, at the closest


class FireBudget:
    """``rate`` fires per second per tenant, in bursts of up to ``burst`` (``rate`` 0: no limit).
    Tenants whose bucket is full again are forgotten, so idle tenants cost nothing."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._sweep_at = SWEEP_AT

    def _tokens(self, tenant: str, now: float) -> float:
        tokens, at = self._buckets.get(tenant, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, tenant: str) -> bool:
        """Spend one fire of ``tenant``'s budget; False (nothing spent) when there is none left."""
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens = self._tokens(tenant, now)
        if tokens < 1:
            return False
        self._buckets[tenant] = (tokens - 1, now)
        if len(self._buckets) > self._sweep_at:
            self._buckets = {t: b for t, b in self._buckets.items() if self._tokens(t, now) < self.burst}
            self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))  # amortised O(1) per take
        return True

    def exhausted(self) -> set[str]:
        """Tenants with no fire left right now (the claim passes over their schedules)."""
        if self.rate <= 0:
            return set()
        now = self._clock()
        return {t for t in self._buckets if self._tokens(t, now) < 1}

    def __len__(self) -> int:
        return len(self._buckets)
