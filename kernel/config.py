"""Kernel settings, with the defaults a serious workflow engine ships (Cloudflare Workflows' limits)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.kernel.sandbox import ENVELOPE_BYTES, Limits


def default_data_dir() -> Path:
    """``$TENANTFLOW_DATA_DIR``, else ``~/.local/share/tenantflow``."""
    env = os.environ.get("TENANTFLOW_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "tenantflow"


def default_node_id(data_dir: Path) -> str:
    """A node id that is the same for a kernel restarted on its data directory (so it reclaims its
    own leases at once) and differs between kernels with different data directories (two kernels
    sharing a storage under one id would pass each other's lease guards)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def hold_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir`` for this process (released when it exits, however it dies); raise
    ``SystemExit`` naming the directory if another kernel holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "kernel.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(
            f"error: another kernel is running with --data-dir {data_dir}: give each kernel its own "
            "data directory (and its own --node-id when they share a storage)"
        ) from None
    return fd


def lease_problem(lease_seconds: float, renew_seconds: float) -> str:
    """Why these lease settings cannot work ("" if they can)."""
    if not lease_seconds >= 1:
        return f"the lease must last at least 1 s, got {lease_seconds:g}"
    if not 0 <= renew_seconds <= lease_seconds / 2:
        return (
            f"leases must be renewed at least twice per lease: the renewal interval {renew_seconds:g} s "
            f"must be at most half the {lease_seconds:g} s lease (0 picks a quarter of it)"
        )
    return ""


@dataclass
class KernelConfig:
    """Everything ``tenantflow serve`` can set."""

    data_dir: Path = field(default_factory=default_data_dir)
    storage_url: str = ""  # default: sqlite:///<data_dir>/tenantflow.sqlite3
    node_id: str = "local"  # leases are held per node; a restarted node reclaims its own at once
    max_concurrent_runs: int = 64
    # wake-ups of one tenant at once (None: half of max_concurrent_runs, at least 1; 0: only the global
    # limit). A fair share by default: one tenant's long steps cannot hold every slot.
    max_running_per_tenant: int | None = None
    tenant_create_rate: float = 100.0  # instances a tenant may create per second (0: no limit)
    tenant_create_burst: float = 1000.0  # ... in bursts of up to this many
    tenant_max_live: int = 0  # instances of a tenant not yet ended (0: no cap)
    tenant_max_schedules: int = 1000  # schedules of a tenant, paused ones included (0: no cap)
    tenant_schedule_fire_rate: float = 10.0  # fires per second of a tenant's schedules (0: no limit)
    tenant_schedule_fire_burst: float = 100.0  # ... in bursts of up to this many
    schedule_min_interval: float = 1.0  # seconds between two fires of one schedule, at the closest
    # A node renews the leases of the instances it runs every lease_renew_seconds (0: a quarter of the
    # lease); a node that dies stops renewing, and the others take its instances over once they expire.
    lease_seconds: float = 6.0
    lease_renew_seconds: float = 0.0
    limits: Limits = field(default_factory=Limits)
    max_payload_bytes: int = 1024 * 1024
    max_steps: int = 10_000
    max_batch: int = 100
    max_sleep_seconds: float = 365 * 86400.0
    # The longest time-out a step attempt gets (None: limits.wall_seconds); a step asking for more is
    # capped, so no tenant holds a slot past max(wall_seconds, this) plus the commit grace.
    max_step_timeout: float | None = None
    # Stored step outputs (and error messages) of one instance: what each wake-up's job and each Get
    # carry. Cloudflare Workflows caps persisted state per instance likewise.
    max_instance_state_bytes: int = 32 * 1024 * 1024
    # Unread events one instance may hold (SendEvent past either: RESOURCE_EXHAUSTED; 0: no cap). A
    # wait consumes one event at a time, so more than this is a backlog nobody reads; 16 MiB is 16
    # events at the 1 MiB payload limit and half the state cap, so the inbox never outweighs the rest.
    max_inbox_events: int = 1000
    max_inbox_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 1024  # gRPC calls in progress at once, streams included (0: no cap)
    # Bytes of large Publish requests being checked or queued, kernel-wide (the rest fail fast)
    max_publish_bytes_in_flight: int = 64 * 1024 * 1024
    max_log_lines_per_run: int = 1000
    max_log_bytes_per_run: int = 1024 * 1024
    tenant_log_lines_per_second: float = 200.0  # one tenant across its wake-ups, bursts of 10 s (0: no limit)
    tenant_log_bytes_per_second: float = 256 * 1024.0  # ... likewise in bytes
    log_flood_factor: float = 10.0  # a wake-up sending this many times its log budget is stopped
    max_code_bytes: int = 10 * 1024 * 1024
    code_cache_entries: int = 256
    code_cache_bytes: int = 64 * 1024 * 1024  # of tenant source held in memory
    code_cache_idle_seconds: float = 300.0
    retention_seconds: float = 30 * 86400.0  # ended instances are deleted this long after (0: never)
    # git+file refs may only name repositories under these directories, git+https refs only URLs under
    # these https:// prefixes; '{tenant}' in a root stands for the calling tenant. Empty: git refs refused.
    git_roots: list[str] = field(default_factory=list)
    # directories the operator grants tenant code read-write access to (none by default)
    sandbox_writable_dirs: list[str] = field(default_factory=list)
    sandbox_network: bool = False  # let tenant code open connections (sandboxes that have sockets)
    # idle run processes kept for returning tenants' next wake-ups (python sandbox; 0: a fresh process
    # per wake-up), and how long one is kept without a wake-up
    warm_runners: int = 64
    warm_runner_idle_seconds: float = 10.0
    # where ctx.workspace() trees live (kernel/workspace.py; None: steps get no workspace), and the
    # bytes a tenant's steps may write into its workspaces (0: no limit)
    workspace_root: Path | None = None
    workspace_quota_bytes: int = 1024 * 1024 * 1024
    # run tenant code even where a sandbox protection is missing (each one logged as a WARNING)
    unsafe_allow_weak_sandbox: bool = False
    metrics_listen: str = ""  # HOST:PORT of the Prometheus /metrics endpoint ("": none)
    metrics_tenant_labels: int = 0  # tenants with a metrics label of their own, the most active (0: none)
    log_format: str = "text"  # or "json": one object per line
    otel: bool = False  # OpenTelemetry traces (also on when OTEL_* variables configure an exporter)
    # A tenant's own key-value store (ctx.kv, the KV service): per-tenant quotas (0: none), the largest
    # value, and what one step attempt may write (sent with its result) and read (round trips).
    kv_max_keys: int = 100_000
    kv_max_bytes: int = 256 * 1024 * 1024
    kv_max_value_bytes: int = 64 * 1024
    kv_max_writes_per_step: int = 1000
    kv_max_reads_per_step: int = 10_000
    secrets_key_file: str = ""  # AES-256-GCM keys sealing tenants' secrets ("": Secrets.Put refused)
    # Tenants.List answers (else FAILED_PRECONDITION): a tenant's name is itself information
    list_tenants: bool = False

    def __post_init__(self) -> None:
        # A guest message must have room for the largest output it may carry.
        room = self.max_payload_bytes + ENVELOPE_BYTES
        if self.limits.message_bytes < room:
            self.limits = dataclasses.replace(self.limits, message_bytes=room)

    @property
    def tenant_running_cap(self) -> int:
        """Wake-ups one tenant may run at once on this node's claims (0: no cap)."""
        if self.max_running_per_tenant is None:
            return max(1, self.max_concurrent_runs // 2)
        return self.max_running_per_tenant

    @property
    def step_timeout_ceiling(self) -> float:
        """The longest time-out a step attempt gets."""
        return self.limits.wall_seconds if self.max_step_timeout is None else self.max_step_timeout

    @property
    def response_bytes_limit(self) -> int:
        """The largest gRPC message the kernel sends: a Get of an instance at its state cap, with its
        params, output, step names and error messages."""
        return max(
            64 * 1024 * 1024, self.max_instance_state_bytes + 2 * self.max_payload_bytes + 32 * 1024 * 1024
        )

    @property
    def lease_renew_interval(self) -> float:
        return self.lease_renew_seconds or self.lease_seconds / 4

    def resolved_storage_url(self) -> str:
        return self.storage_url or f"sqlite:///{self.data_dir / 'tenantflow.sqlite3'}"
