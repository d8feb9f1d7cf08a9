"""Prometheus metrics of the kernel and the ``/metrics`` endpoint (``tenantflow serve --metrics-listen``).

The kernel calls the hooks below at the points it decides things (a wake-up starts or ends, a step
attempt starts or fails, a batch commits, a claim returns, a quota refuses); each hook records its
metrics and, when tracing is on, the matching span (:mod:`tenantflow.kernel.tracing`). Metrics live in
a registry of their own, so nothing else in the process leaks into the scrape.

Per-tenant labels are off by default (``--metrics-tenant-labels 0``). With N > 0, at most N tenants
have a ``tenant`` label of their own and everyone else is ``tenant="other"``: labels go to the most
active tenants, re-ranked every minute by the activity seen in that minute, and a tenant that drops
out of the top N loses its series. So 100,000 tenants cost N + 1 series per family, never more.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_wsgi_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tenantflow.kernel import logformat, tracing
from tenantflow.kernel.model import InstanceRecord, Status, StepRecord

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("tenantflow.metrics")
_sandbox_log = logging.getLogger("tenantflow.sandbox")
F = TypeVar("F", bound=Callable[..., Any])
OTHER = "other"
RERANK_SECONDS = 60.0
STATUS_CACHE_SECONDS = 10.0  # instances by status are counted by storage at most this often
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_LONG = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)  # steps, wake-ups
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_code_hit: contextvars.ContextVar[bool] = contextvars.ContextVar("tenantflow_code_hit", default=True)


class Run(Protocol):
    """What the wake-up and step hooks read of a run (the kernel's journal of one wake-up)."""

    record: InstanceRecord
    aborted: str
    steps: dict[str, StepRecord]

    @property
    def flights(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class Scraped:
    """What a scrape reads of the running kernel, each read when asked."""

    wakeups_running: Callable[[], int]
    code_cache: Callable[[], tuple[int, int]]  # entries, bytes of source
    count_by_status: Callable[[], dict[Status, int]] | None  # None: the storage cannot count


class TenantLabels:
    """Which tenants get a label of their own: at most ``limit``, the most active ones.

    Activity is tallied per window of ``interval`` seconds (for at most ``20 * limit`` distinct
    tenants, so memory stays bounded too); at the end of a window the top ``limit`` keep or take the
    labels, incumbents winning ties. Free labels go to the first active tenants at once."""

    def __init__(
        self, limit: int, interval: float = RERANK_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.labeled: set[str] = set()
        self.on_demote: Callable[[str], None] = lambda tenant: None
        self._interval = interval
        self._clock = clock
        self._window: Tally[str] = Tally()
        self._cap = max(1000, 20 * limit)
        self._next = clock() + interval
        self._lock = threading.Lock()

    def label(self, tenant: str) -> str:
        """Count one unit of ``tenant``'s activity; return its label value."""
        with self._lock:
            if tenant in self._window or len(self._window) < self._cap:
                self._window[tenant] += 1
            if self._clock() >= self._next:
                self._rerank()
            if tenant not in self.labeled and len(self.labeled) < self.limit:
                self.labeled.add(tenant)
            return tenant if tenant in self.labeled else OTHER

    def _rerank(self) -> None:
        ranked = sorted(self._window.items(), key=lambda kv: (-kv[1], kv[0] not in self.labeled, kv[0]))
        top = {tenant for tenant, _ in ranked[: self.limit]}
        # Idle incumbents keep their labels while nobody outranks them.
        idle = sorted(self.labeled - set(self._window))
        top.update(idle[: self.limit - len(top)])
        for tenant in self.labeled - top:
            self.on_demote(tenant)
        self.labeled = top
        self._window.clear()
        self._next = self._clock() + self._interval


@dataclass
class _Seen:
    """What the hooks remember about one wake-up in flight."""

    started: float
    runtime: str = ""
    outcome: str = ""
    span: Any = None
    attempts: dict[str, tuple[float, Any]] = field(default_factory=dict)  # step key -> (start, span)


class KernelMetrics:
    """Every metric the kernel exports, in one registry."""

    def __init__(self, tenant_labels: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenants = TenantLabels(tenant_labels)
        self.tenants.on_demote = self._demote
        t = ["tenant"] if tenant_labels > 0 else []
        r = self.registry
        self.rpc_handled = Counter("tenantflow_rpc_handled", "RPCs completed, by method and status code",
                                   ["service", "method", "code"], registry=r)  # fmt: skip
        self.rpc_seconds = Histogram("tenantflow_rpc_duration_seconds", "RPC latency (for Watch: the stream's life)",
                                     ["service", "method"], buckets=_LATENCY, registry=r)  # fmt: skip
        self.attempts = Counter("tenantflow_step_attempts", "step attempts started", t, registry=r)
        self.failures = Counter("tenantflow_step_failures", "step attempts that failed (error, crash or time-out)",
                                t, registry=r)  # fmt: skip
        self.retries = Counter(
            "tenantflow_step_retries", "failed attempts that will be retried", t, registry=r
        )
        self.kv_conflicts = Counter("tenantflow_step_kv_conflicts",
                                    "step attempts whose ctx.kv writes a KV conflict refused", t, registry=r)  # fmt: skip
        self.step_seconds = Histogram("tenantflow_step_duration_seconds", "step attempt duration, by outcome",
                                      ["outcome"], buckets=_LONG, registry=r)  # fmt: skip
        self.wakeups = Counter(
            "tenantflow_wakeups", "wake-ups ended, by outcome", ["outcome", *t], registry=r
        )
        self.wakeup_seconds = Histogram("tenantflow_wakeup_duration_seconds", "wake-up duration",
                                        buckets=_LONG, registry=r)  # fmt: skip
        self.timer_lag = Histogram("tenantflow_timer_lag_seconds",
                                   "from the time an instance was due (created, timer, event, retry) to its wake-up",
                                   buckets=_LATENCY, registry=r)  # fmt: skip
        self.claim_size = Histogram("tenantflow_claim_batch_size", "instances leased per claim",
                                    buckets=_SIZES, registry=r)  # fmt: skip
        self.claim_seconds = Histogram("tenantflow_claim_duration_seconds", "claim latency",
                                       buckets=_LATENCY, registry=r)  # fmt: skip
        self.started_at_create = Counter("tenantflow_started_at_create",
                                         "instances created leased to this node and started without a claim",
                                         registry=r)  # fmt: skip
        self.commit_size = Histogram("tenantflow_commit_batch_size", "changes per group commit",
                                     buckets=_SIZES, registry=r)  # fmt: skip
        self.commit_seconds = Histogram("tenantflow_commit_duration_seconds", "group commit latency",
                                        buckets=_LATENCY, registry=r)  # fmt: skip
        self.sandbox_starts = Counter(
            "tenantflow_sandbox_starts", "sandbox runs started", ["runtime"], registry=r
        )
        self.cold_starts = Counter("tenantflow_sandbox_cold_starts",
                                   "sandbox runs whose code was not in the code cache", ["runtime"], registry=r)  # fmt: skip
        self.kills = Counter("tenantflow_sandbox_kills",
                             "sandbox runs stopped or died, by reason (cpu, memory, wall, timeout, crash, stopped)",
                             ["runtime", "reason"], registry=r)  # fmt: skip
        self.code_hits = Counter("tenantflow_code_cache_hits", "code lookups served from memory", registry=r)
        self.code_misses = Counter(
            "tenantflow_code_cache_misses", "code lookups that loaded code", registry=r
        )
        self.code_evictions = Counter("tenantflow_code_cache_evictions", "loaded code dropped", registry=r)
        self.refusals = Counter("tenantflow_quota_refusals", "requests refused by a per-tenant quota",
                                ["quota", *t], registry=r)  # fmt: skip
        self.schedule_fires = Counter("tenantflow_schedule_fires", "schedule ticks that started an instance",
                                      t, registry=r)  # fmt: skip
        self.schedule_skipped = Counter("tenantflow_schedule_fires_skipped",
                                        "schedule ticks that started no instance, by reason (overlap: the last "
                                        "one still live; catchup: missed past the catch-up window; late: passed "
                                        "over by a later fire; error: Create refused it)", ["reason", *t], registry=r)  # fmt: skip
        self.schedule_deferred = Counter("tenantflow_schedule_fires_deferred",
                                         "due schedules put back because their tenant had no fire budget left",
                                         t, registry=r)  # fmt: skip
        self.schedule_lag = Histogram("tenantflow_schedule_fire_lag_seconds", "from a schedule's tick to its fire",
                                      buckets=_LATENCY, registry=r)  # fmt: skip
        ProcessCollector(registry=r)
        self._tenant_families = [self.attempts, self.failures, self.retries, self.wakeups, self.refusals,
                                 self.schedule_fires, self.schedule_skipped, self.schedule_deferred]  # fmt: skip
        self._seen: weakref.WeakKeyDictionary[Run, _Seen] = weakref.WeakKeyDictionary()

    def labels(self, tenant: str) -> list[str]:
        """The tenant label values (none when per-tenant labels are off)."""
        return [self.tenants.label(tenant)] if self.tenants.limit > 0 else []

    def _demote(self, tenant: str) -> None:
        for family in self._tenant_families:
            family.remove_by_labels({"tenant": tenant})


_m = KernelMetrics()


def configure(tenant_labels: int) -> KernelMetrics:
    """Start afresh with ``tenant_labels`` (0: off) tenants labelled; return the metrics."""
    global _m
    _m = KernelMetrics(tenant_labels)
    return _m


def current() -> KernelMetrics:
    return _m


def _count(counter: Counter, labels: list[str]) -> None:
    (counter.labels(*labels) if labels else counter).inc()


def _safe(hook: F) -> F:
    """Observing must never change what the kernel does: a failing hook is logged, not raised."""

    @functools.wraps(hook)
    def safe(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception:
            log.exception("metrics hook %s failed", hook.__name__)
            return None

    return safe  # type: ignore[return-value]


# -- hooks: wake-ups and steps (kernel/executor.py, kernel/wakeup.py, the step kinds) ---------------------------------------------------
@contextlib.contextmanager
def wakeup(run: Run) -> Iterator[None]:
    """Around one wake-up: timer lag, duration, outcome, its span, and the log context."""
    tokens = _wakeup_began(run) or []
    try:
        yield
    finally:
        logformat.unbind(tokens)
        _wakeup_ended(run)


@_safe
def _wakeup_began(run: Run) -> logformat.Tokens:
    rec = run.record
    if rec.run_at:
        _m.timer_lag.observe(max(0.0, time.time() - rec.run_at))
    span = tracing.start_wakeup(rec.tenant, rec.id, rec.workflow, rec.runtime)
    _m._seen[run] = _Seen(started=time.monotonic(), span=span)
    return logformat.bind(tenant=rec.tenant, instance=rec.id)


@_safe
def _wakeup_ended(run: Run) -> None:
    rec, seen = run.record, _m._seen.pop(run, None)
    if seen is None:
        return
    what = seen.outcome or ("aborted" if run.aborted else "not_started")
    for _, span in seen.attempts.values():
        tracing.end(span, "interrupted", "the wake-up ended during the attempt")
    _m.wakeups.labels(what, *_m.labels(rec.tenant)).inc()
    _m.wakeup_seconds.observe(time.monotonic() - seen.started)
    tracing.end(seen.span, what, what if what in ("errored", "crashed", "timed_out") else "")
    if what in ("complete", "errored", "aborted"):
        tracing.forget(rec.tenant, rec.id)


@_safe
def outcome(run: Run, what: str) -> None:
    """How the wake-up ended: complete, errored, waiting, paused, suspended, crashed, timed_out,
    code_unavailable (the last one recorded wins)."""
    seen = _m._seen.get(run)
    if seen is not None:
        seen.outcome = what


@_safe
def sandbox_started(run: Run, runtime: str) -> None:
    """A sandbox run starts; it is cold when this wake-up had to load its code."""
    _m.sandbox_starts.labels(runtime).inc()
    if not _code_hit.get():
        _m.cold_starts.labels(runtime).inc()
    seen = _m._seen.get(run)
    if seen is not None:
        seen.runtime = runtime


@_safe
def sandbox_ended(run: Run, runtime: str, detail: str, stopped: str) -> None:
    """The sandbox run is over; count a kill, classified from what the sandbox or the kernel said."""
    reason = kill_reason(detail, stopped, run.aborted)
    if not reason:
        return
    _m.kills.labels(runtime, reason).inc()
    if reason != "stopped":  # stops asked for (terminate, pause, restart) are not news
        steps = sorted({run.steps[key].name for key in run.flights if key in run.steps})
        _sandbox_log.info("%s run of %s/%s stopped (%s): %s", runtime, run.record.tenant, run.record.id,
                          reason, stopped or detail, extra={"step": ", ".join(steps)})  # fmt: skip


def kill_reason(detail: str, stopped: str, aborted: str) -> str:
    """``""`` for a run that ended by itself, else cpu, memory, wall, timeout, crash or stopped."""
    if stopped:  # the kernel stopped it: a step time-out, the wall-clock limit, a log flood
        return "timeout" if stopped == "step time-out" else "wall" if "wall-clock" in stopped else "stopped"
    if aborted:
        return "stopped"
    text = detail.lower()
    if not text:
        return ""
    if "cpu" in text:
        return "cpu"
    if "memory" in text:
        return "memory"
    if "wall-clock" in text:
        return "wall"
    return "crash"


@_safe
def attempt_started(run: Run, step: StepRecord) -> None:
    rec = run.record
    _count(_m.attempts, _m.labels(rec.tenant))
    logformat.bind(tenant=rec.tenant, instance=rec.id, step=step.name)
    seen = _m._seen.get(run)
    if seen is not None:
        span = tracing.start_attempt(seen.span, rec.tenant, rec.id, step.name, step.attempts)
        seen.attempts[step.key] = (time.monotonic(), span)


@_safe
def attempt_succeeded(run: Run, step: StepRecord) -> None:
    _attempt_ended(run, step, "ok", "")


@_safe
def attempt_failed(run: Run, step: StepRecord, error: dict[str, str], *, retry: bool) -> None:
    """A failed attempt (raised, crashed or timed out); ``retry``: another attempt will follow."""
    labels = _m.labels(run.record.tenant)
    _count(_m.failures, labels)
    if retry:
        _count(_m.retries, labels)
    _attempt_ended(run, step, "error", error.get("name") or "failed")


@_safe
def kv_conflict(run: Run) -> None:
    """A step attempt's writes were refused because a key it read changed (it runs again or fails)."""
    _count(_m.kv_conflicts, _m.labels(run.record.tenant))


def _attempt_ended(run: Run, step: StepRecord, what: str, error: str) -> None:
    seen = _m._seen.get(run)
    started = seen.attempts.pop(step.key, None) if seen is not None else None
    if started is not None:
        _m.step_seconds.labels(what).observe(time.monotonic() - started[0])
        tracing.end(started[1], what, error)


# -- hooks: claims, commits, code, quotas -----------------------------------------------------------
@_safe
def claimed(count: int, seconds: float) -> None:
    _m.claim_size.observe(count)
    _m.claim_seconds.observe(seconds)


@_safe
def started_at_create(count: int) -> None:
    _m.started_at_create.inc(count)


@_safe
def committed(count: int, seconds: float) -> None:
    _m.commit_size.observe(count)
    _m.commit_seconds.observe(seconds)


@_safe
def code_cache(hit: bool) -> None:
    """A code lookup; a miss also marks the wake-up asking (if any) as a cold start."""
    (_m.code_hits if hit else _m.code_misses).inc()
    _code_hit.set(hit)


@_safe
def code_evicted(count: int) -> None:
    if count:
        _m.code_evictions.inc(count)


@_safe
def quota_refused(tenant: str, quota: str) -> None:
    """``quota``: create_rate or max_live."""
    _m.refusals.labels(quota, *_m.labels(tenant)).inc()


@_safe
def schedule_fired(tenant: str, lag: float) -> None:
    """A schedule's tick started an instance ``lag`` seconds after the tick."""
    _count(_m.schedule_fires, _m.labels(tenant))
    _m.schedule_lag.observe(max(0.0, lag))


@_safe
def schedule_skipped(tenant: str, reason: str, ticks: int = 1) -> None:
    """``ticks`` of a schedule started nothing; ``reason``: overlap, catchup, late or error."""
    if ticks > 0:
        (_m.schedule_skipped.labels(reason, *_m.labels(tenant))).inc(ticks)


@_safe
def schedule_deferred(tenant: str) -> None:
    _count(_m.schedule_deferred, _m.labels(tenant))


@contextlib.contextmanager
def counting_refusals(tenant: str, quota: str) -> Iterator[None]:
    """Count a :class:`~tenantflow.kernel.errors.ResourceExhausted` raised inside as a refusal."""
    from tenantflow.kernel.errors import ResourceExhausted

    try:
        yield
    except ResourceExhausted:
        quota_refused(tenant, quota)
        raise


# -- RPCs (kernel/server.py) ------------------------------------------------------------------------
_FOLLOWED = {"Create", "CreateBatch", "SendEvent", "Resume", "Restart"}  # calls that make an instance run


@dataclass
class RpcCall:
    """What the server learns of a call as it goes: its decoded request, then its response."""

    request: Any = None
    response: Any = None


@contextlib.contextmanager
def rpc(
    service: str, name: str, context: grpc.aio.ServicerContext[Any, Any], call: RpcCall | None = None
) -> Iterator[RpcCall]:
    """Count one RPC by method and code, time it, and trace it (continuing the caller's trace);
    the server fills in the request of ``call`` once decoded (a call refused before that has no
    tenant)."""
    started, call = time.perf_counter(), call or RpcCall()
    code = "UNKNOWN"
    with tracing.rpc_span(f"{service}/{name}", context.invocation_metadata()) as span:
        try:
            yield call
            code = _code(context, "OK")
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            _m.rpc_handled.labels(service, name, code).inc()
            _m.rpc_seconds.labels(service, name).observe(time.perf_counter() - started)
            tracing.rpc_ended(span, code, str(getattr(call.request, "tenant", "") or ""))
            if code == "OK" and name in _FOLLOWED:
                tracing.follow(span, *_instances(call.request, call.response))


def _code(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((str(c.name) for c in grpc.StatusCode if c.value[0] == code), default)
    return default


def _instances(request: Any, response: Any) -> tuple[str, list[str]]:
    """(tenant, ids) an RPC made runnable, from its response (created ids) or its request."""
    if hasattr(response, "instances"):  # CreateBatch
        return (
            response.instances[0].tenant if response.instances else "",
            [i.id for i in response.instances],
        )
    if hasattr(response, "id") and hasattr(response, "tenant"):  # Create, Resume, Restart
        return response.tenant, [response.id]
    return str(getattr(request, "tenant", "")), [str(getattr(request, "id", ""))]  # SendEvent


# -- the endpoint -----------------------------------------------------------------------------------
class _KernelCollector(Collector):
    """Gauges read on scrape: wake-ups running, code cache size, and instances by status (counted by
    storage at most every ``STATUS_CACHE_SECONDS``, so a scrape storm costs one query per period)."""

    def __init__(self, scraped: Scraped) -> None:
        self._scraped = scraped
        self._counts: dict[Status, int] | None = None
        self._counted_at = -STATUS_CACHE_SECONDS
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        scraped = self._scraped
        yield GaugeMetricFamily("tenantflow_wakeups_running", "wake-ups running in this kernel now",
                                value=scraped.wakeups_running())  # fmt: skip
        entries, size = scraped.code_cache()
        yield GaugeMetricFamily("tenantflow_code_cache_entries", "loaded code held in memory", value=entries)
        yield GaugeMetricFamily("tenantflow_code_cache_bytes", "tenant source held in memory", value=size)
        counts = self._status_counts()
        if counts is None:
            return
        by_status = GaugeMetricFamily(
            "tenantflow_instances", "instances in storage, by status", labels=["status"]
        )
        for status in Status:
            if status != Status.UNSPECIFIED:
                by_status.add_metric([status.name.lower()], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily("tenantflow_instances_hibernating",
                                "instances asleep or waiting for an event: no process, no memory, only rows",
                                value=counts.get(Status.WAITING, 0))  # fmt: skip

    def _status_counts(self) -> dict[Status, int] | None:
        with self._lock:
            if time.monotonic() - self._counted_at >= STATUS_CACHE_SECONDS:
                self._counted_at = time.monotonic()
                count = self._scraped.count_by_status
                try:
                    self._counts = count() if count is not None else None
                except Exception as exc:  # a scrape must not fail because storage is busy
                    log.warning("counting instances by status failed: %s", exc)
            return self._counts


class Endpoint:
    """The ``/metrics`` HTTP server (a daemon thread)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = str(server.server_address[0]), int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(address: str, scraped: Scraped) -> Endpoint:
    """Serve ``/metrics`` on ``address`` (HOST:PORT; port 0 picks a free one), reading ``scraped``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdecimal():
        raise ValueError(f"--metrics-listen {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    _m.registry.register(_KernelCollector(scraped))
    try:
        server, thread = start_wsgi_server(int(port), host.strip("[]") or "0.0.0.0", registry=_m.registry)
    except OSError as exc:
        raise ValueError(f"--metrics-listen {address!r}: cannot listen there ({exc})") from None
    return Endpoint(server, thread)
