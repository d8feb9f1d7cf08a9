"""Log budgets: what a guest's log lines may cost the kernel.

Every log line a guest sends is charged, before it is decoded, to its wake-up (lines and bytes per
wake-up) and to its tenant (token buckets of lines and bytes per second, shared by all of the
tenant's wake-ups on this kernel). A line over either budget is dropped unread and counted; the
count is said once, in one history line at the end of the wake-up. A wake-up that sends
``flood_factor`` times its own budget is stopped, so one guest can never keep the kernel busy
reading lines it will drop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST_SECONDS = 10.0  # a tenant's buckets hold this many seconds of its rate


def size_text(n: float) -> str:
    """Bytes for people: ``512 bytes``, ``64 KiB``, ``1.5 MiB``."""
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} bytes"


SWEEP_AT = 10_000  # tenants' buckets held before the refilled ones are forgotten


class TenantLogRate:
    """Per-tenant token buckets of log lines and bytes per second (a rate of 0: no limit).

    Safe to call from any thread (wasm guests log from worker threads). Buckets that have
    refilled are forgotten, so idle tenants cost nothing."""

    def __init__(self, lines_per_second: float, bytes_per_second: float) -> None:
        self.lines_per_second = lines_per_second
        self.bytes_per_second = bytes_per_second
        self._lines_burst = max(lines_per_second * BURST_SECONDS, 1.0)
        self._bytes_burst = max(bytes_per_second * BURST_SECONDS, 1.0)
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tenant -> (lines, bytes, at)
        self._sweep_at = SWEEP_AT
        self._lock = threading.Lock()

    def take(self, tenant: str, size: int, now: float | None = None) -> bool:
        """Spend one line of ``size`` bytes from ``tenant``'s buckets; False if either is short."""
        if self.lines_per_second <= 0 and self.bytes_per_second <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            lines, size_left, at = self._buckets.get(tenant, (self._lines_burst, self._bytes_burst, now))
            lines = min(self._lines_burst, lines + (now - at) * self.lines_per_second)
            size_left = min(self._bytes_burst, size_left + (now - at) * self.bytes_per_second)
            ok = (self.lines_per_second <= 0 or lines >= 1) and (
                self.bytes_per_second <= 0 or size_left >= size
            )
            if ok:
                lines, size_left = lines - 1, size_left - size
            self._buckets[tenant] = (lines, size_left, now)
            if len(self._buckets) > self._sweep_at:
                self._forget_full(now)
        return ok

    def _forget_full(self, now: float) -> None:
        self._buckets = {
            t: (lines, size_left, at)
            for t, (lines, size_left, at) in self._buckets.items()
            if lines + (now - at) * self.lines_per_second < self._lines_burst
            or size_left + (now - at) * self.bytes_per_second < self._bytes_burst
        }
        # Many tenants still refilling: sweep again only once as many more arrive (amortised O(1)).
        self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))

    def describe(self) -> str:
        parts = []
        if self.lines_per_second > 0:
            parts.append(f"{self.lines_per_second:g} lines")
        if self.bytes_per_second > 0:
            parts.append(size_text(self.bytes_per_second))
        return " and ".join(parts) + " per second per tenant"


class LogBudget:
    """One wake-up's log budget. :meth:`admit` runs on one thread at a time (the guest's reader)."""

    def __init__(
        self,
        tenant: str,
        rate: TenantLogRate,
        max_lines: int,
        max_bytes: int,
        flood_factor: float,
        on_flood: Callable[[str], None],
    ) -> None:
        self.tenant = tenant
        self.rate = rate
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.flood_lines = flood_factor * max_lines
        self.flood_bytes = flood_factor * max_bytes
        self.flood_factor = flood_factor
        self._on_flood = on_flood
        self.sent_lines = self.sent_bytes = 0
        self.kept_lines = self.kept_bytes = 0
        self.dropped_lines = self.dropped_bytes = 0
        self.over_run = self.over_tenant = False
        self.flooded = False
        self._said = False

    def admit(self, size: int) -> bool:
        """Charge one line of ``size`` bytes; False: drop it (counted)."""
        self.sent_lines += 1
        self.sent_bytes += size
        if self.sent_lines > self.flood_lines or self.sent_bytes > self.flood_bytes:
            if not self.flooded:
                self.flooded = True
                self._on_flood(
                    f"log flood: the workflow sent over {self.flood_lines:g} log lines or "
                    f"{size_text(self.flood_bytes)} in one wake-up ({self.flood_factor:g} times its budget of "
                    f"{self.max_lines} lines and {size_text(self.max_bytes)}), so the kernel stopped it: "
                    "log less, e.g. a summary per step instead of a line per item"
                )
            return self._drop(size)
        if self.kept_lines >= self.max_lines or self.kept_bytes + size > self.max_bytes:
            self.over_run = True
            return self._drop(size)
        if not self.rate.take(self.tenant, size):
            self.over_tenant = True
            return self._drop(size)
        self.kept_lines += 1
        self.kept_bytes += size
        return True

    def _drop(self, size: int) -> bool:
        self.dropped_lines += 1
        self.dropped_bytes += size
        return False

    def summary(self) -> str:
        """The one line that says what was dropped ("" if nothing was, or once it has been said)."""
        if self._said or not self.dropped_lines:
            return ""
        self._said = True
        over = []
        if self.over_run or self.flooded:
            over.append(f"per-run ({self.max_lines} lines, {size_text(self.max_bytes)} per wake-up)")
        if self.over_tenant:
            over.append(f"per-tenant ({self.rate.describe()})")
        return (
            f"[tenantflow] {self.dropped_lines} log lines ({self.dropped_bytes} bytes) dropped: over the "
            f"{' / '.join(over)} log budget"
        )
