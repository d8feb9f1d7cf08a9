"""``tenantflow serve``: its flags, checked with messages a person can act on, and the kernel's
life from start to SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenantflow.kernel.cliargs import DefaultsShown
from tenantflow.kernel.logformat import stdout_line

DEFAULT_ADDRESS = "127.0.0.1:7450"


async def serve(args: argparse.Namespace) -> None:
    from tenantflow.kernel.admission import Budgets
    from tenantflow.kernel.auth import Tokens
    from tenantflow.kernel.config import KernelConfig, default_data_dir, hold_data_dir, lease_problem
    from tenantflow.kernel.sandbox import Limits
    from tenantflow.kernel.server import create_server, servicers
    from tenantflow.kernel.service import Kernel

    if problem := lease_problem(args.lease_seconds, args.lease_renew_seconds):
        raise SystemExit(f"error: --lease-seconds/--lease-renew-seconds: {problem}")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    from tenantflow.kernel.grants import grant_problem, kernel_state

    state = kernel_state(
        data_dir=data_dir,
        storage_url=args.storage or "",
        token_file=args.auth_tokens,
        tls_files=(args.tls_cert, args.tls_key),
        git_roots=args.git_root or [],
    )
    if problem := grant_problem(args.sandbox_writable_dir or [], state):
        raise SystemExit(f"error: {problem}")
    if args.workspace_root and (problem := grant_problem([args.workspace_root], state)):
        raise SystemExit(f"error: --workspace-root: {problem}")
    hold_data_dir(data_dir)  # one kernel per data directory, for the life of this process
    config = KernelConfig(
        data_dir=data_dir,
        storage_url=args.storage or "",
        node_id=args.node_id,
        lease_seconds=args.lease_seconds,
        lease_renew_seconds=args.lease_renew_seconds,
        max_concurrent_runs=args.max_concurrent,
        max_running_per_tenant=args.max_running_per_tenant,
        max_step_timeout=args.max_step_timeout,
        max_instance_state_bytes=int(args.max_instance_state_mb * 1024 * 1024),
        max_inbox_events=args.max_inbox_events,
        max_inbox_bytes=int(args.max_inbox_mb * 1024 * 1024),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_publish_bytes_in_flight=int(args.max_publish_mb_in_flight * 1024 * 1024),
        tenant_create_rate=args.tenant_create_rate,
        tenant_create_burst=args.tenant_create_burst,
        tenant_max_live=args.tenant_max_live,
        tenant_max_schedules=args.tenant_max_schedules,
        tenant_schedule_fire_rate=args.tenant_schedule_fire_rate,
        tenant_schedule_fire_burst=args.tenant_schedule_fire_burst,
        schedule_min_interval=args.schedule_min_interval,
        limits=Limits(
            memory_bytes=args.memory_mb * 1024 * 1024,
            cpu_seconds=args.cpu_seconds,
            wall_seconds=args.wall_seconds,
        ),
        code_cache_entries=args.code_cache_entries,
        retention_seconds=args.retention_days * 86400,
        code_cache_bytes=int(args.code_cache_mb * 1024 * 1024),
        code_cache_idle_seconds=args.code_cache_idle_seconds,
        git_roots=args.git_root or [],
        sandbox_writable_dirs=args.sandbox_writable_dir or [],
        sandbox_network=args.sandbox_network,
        warm_runners=args.warm_runners,
        warm_runner_idle_seconds=args.warm_runner_idle_seconds,
        workspace_root=Path(args.workspace_root).resolve() if args.workspace_root else None,
        workspace_quota_bytes=int(args.workspace_quota_mb * 1024 * 1024),
        max_log_lines_per_run=args.max_log_lines_per_run,
        max_log_bytes_per_run=int(args.max_log_kib_per_run * 1024),
        tenant_log_lines_per_second=args.tenant_log_lines_rate,
        tenant_log_bytes_per_second=args.tenant_log_kib_rate * 1024,
        log_flood_factor=args.log_flood_factor,
        kv_max_keys=args.kv_max_keys,
        kv_max_bytes=int(args.kv_max_mb * 1024 * 1024),
        kv_max_value_bytes=int(args.kv_max_value_kb * 1024),
        kv_max_writes_per_step=args.kv_max_writes_per_step,
        kv_max_reads_per_step=args.kv_max_reads_per_step,
        secrets_key_file=str(Path(args.secrets_key).resolve()) if args.secrets_key else "",
        unsafe_allow_weak_sandbox=args.unsafe_allow_weak_sandbox,
        metrics_listen=args.metrics_listen or "",
        metrics_tenant_labels=args.metrics_tenant_labels,
        log_format=args.log_format,
        otel=args.otel,
        list_tenants=args.list_tenants,
    )
    if config.secrets_key_file:
        from tenantflow.kernel.secretbox import SecretKeyError, load

        try:
            load(config.secrets_key_file)
        except SecretKeyError as exc:
            raise SystemExit(f"error: --secrets-key: {exc}") from None
    tokens = None
    if args.auth_tokens:
        try:
            tokens = Tokens.load(Path(args.auth_tokens))
        except ValueError as exc:
            raise SystemExit(f"error: --auth-tokens {exc}") from None
    host = args.listen.rsplit(":", 1)[0]
    for where in {host, *([args.http_listen.rsplit(":", 1)[0]] if args.http_listen else [])}:
        if tokens is None and where not in ("127.0.0.1", "localhost", "[::1]", "::1"):
            logging.getLogger("tenantflow.server").warning(
                "listening on %s without --auth-tokens: any client that reaches it may act for any tenant",
                where,
            )
    if args.ui and not args.http_listen:
        raise SystemExit("error: --ui serves the console on the HTTP port: give --http-listen HOST:PORT too")
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if args.tls_cert:
        try:
            tls = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
        except OSError as exc:
            raise SystemExit(f"error: cannot read the TLS key or certificate: {exc}") from None
    from tenantflow.kernel import metrics, tracing

    metrics.configure(config.metrics_tenant_labels)
    try:
        traces = tracing.configure(config.otel, config.node_id)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    kernel = Kernel(config)
    await kernel.start()
    budgets = Budgets.of(
        config,
        per_token=args.max_rpcs_per_token,
        per_peer=args.max_rpcs_per_connection,
        per_tenant=args.max_rpcs_per_tenant,
        request_bytes=int(args.max_request_mb_in_flight * 1024 * 1024),
    )
    services = servicers(kernel)  # one set for both transports
    server, port = await create_server(kernel, args.listen, tokens, tls, budgets, services)
    await server.start()
    http = None
    if args.http_listen:
        from tenantflow.kernel.httpapi import create_http_server

        try:
            tls_files = (args.tls_cert, args.tls_key) if tls else None
            http = await create_http_server(
                kernel, args.http_listen, tokens, tls_files, budgets, services, ui=args.ui
            )
        except Exception as exc:
            await server.stop(None)
            await kernel.stop()
            raise SystemExit(f"error: --http-listen: {exc}") from None
        print(
            stdout_line(f"tenantflow http api on {http.url}", config.log_format, config.node_id), flush=True
        )
    endpoint = None
    if config.metrics_listen:
        try:
            endpoint = metrics.serve(config.metrics_listen, kernel.scraped())
        except ValueError as exc:
            await server.stop(None)
            await kernel.stop()
            raise SystemExit(f"error: {exc}") from None
        print(
            stdout_line(f"tenantflow metrics on {endpoint.url}", config.log_format, config.node_id),
            flush=True,
        )
    if traces:
        logging.getLogger("tenantflow.tracing").info("OpenTelemetry tracing on: %s", traces)
    listening = (
        f"tenantflow kernel listening on {host}:{port}{' (TLS)' if tls else ''} "
        f"(storage {config.resolved_storage_url()})"
    )
    print(stdout_line(listening, config.log_format, config.node_id), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(stdout_line("tenantflow kernel stopping", config.log_format, config.node_id), flush=True)
    await server.stop(grace=2)
    if http is not None:
        await http.stop()
    await kernel.stop()
    if endpoint is not None:
        endpoint.close()
    tracing.shutdown()


def number(kind: type[int] | type[float], minimum: float, what: str) -> Any:
    """An argparse type: ``kind`` at least ``minimum``, with a message saying so."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is too small: {what}")
        return value

    return parse


def _host_port(text: str) -> str:
    """An argparse type: HOST:PORT with a numeric port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:9464 (port 0: any)")
    return text


COUNT = number(int, 1, "use 1 or more")
COUNT_OR_ZERO = number(int, 0, "use 0 or more")
POSITIVE = number(float, 0.001, "use a positive number")
AMOUNT_OR_ZERO = number(float, 0, "use 0 or more")


def run(args: argparse.Namespace) -> None:
    """Serve on uvloop where it is installed: a fifth less kernel CPU per step (loadtests/bench_steps.py)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))


def add_serve_parser(sub: Any) -> None:
    """The ``serve`` sub-command and its flags."""
    s = sub.add_parser("serve", help="run the kernel", formatter_class=DefaultsShown)
    s.add_argument("--listen", default=DEFAULT_ADDRESS, help="HOST:PORT (port 0 picks a free one)")
    s.add_argument(
        "--http-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="also serve the API over HTTP/1.1 and JSON (the Connect protocol) with the same tokens, TLS "
        "and limits (port 0 picks a free one; default: off)",
    )
    s.add_argument(
        "--ui",
        action="store_true",
        help="also serve the browser console at / on the --http-listen port (a client of the HTTP API)",
    )
    s.add_argument(
        "--list-tenants",
        action="store_true",
        help="answer Tenants.List (the console's tenant picker): each token sees the tenants it may act for",
    )
    s.add_argument("--storage", help="storage URL (default sqlite:///<data-dir>/tenantflow.sqlite3)")
    s.add_argument("--data-dir", help="default $TENANTFLOW_DATA_DIR or ~/.local/share/tenantflow")
    s.add_argument(
        "--node-id",
        help="lease owner name, unique per kernel sharing a storage (default: <hostname>-<hash of --data-dir>, "
        "the same across restarts on one data directory)",
    )
    s.add_argument(
        "--lease-seconds",
        type=POSITIVE,
        default=6.0,
        help="how long a node holds an instance without renewing: a dead node's instances run again on "
        "another node within about this long, plus a second",
    )
    s.add_argument(
        "--lease-renew-seconds",
        type=AMOUNT_OR_ZERO,
        default=0.0,
        help="how often a node renews its leases; at most half the lease (0: a quarter of it)",
    )
    s.add_argument("--max-concurrent", type=COUNT, default=64, help="wake-ups running at once")
    s.add_argument(
        "--max-running-per-tenant",
        type=COUNT_OR_ZERO,
        default=None,
        help="wake-ups of one tenant at once (default: half of --max-concurrent, at least 1, so one "
        "tenant's long steps cannot hold every slot; 0: no cap)",
    )
    s.add_argument(
        "--tenant-create-rate",
        type=AMOUNT_OR_ZERO,
        default=100.0,
        help="instances one tenant may create per second (0: no limit)",
    )
    s.add_argument(
        "--tenant-create-burst", type=POSITIVE, default=1000.0, help="... in bursts of up to this many"
    )
    s.add_argument(
        "--tenant-max-live",
        type=COUNT_OR_ZERO,
        default=0,
        help="instances of one tenant not yet complete, errored or terminated (0: no cap)",
    )
    s.add_argument(
        "--tenant-max-schedules",
        type=COUNT_OR_ZERO,
        default=1000,
        help="schedules one tenant may have, paused ones included (0: no cap)",
    )
    s.add_argument(
        "--tenant-schedule-fire-rate",
        type=AMOUNT_OR_ZERO,
        default=10.0,
        help="fires per second of one tenant's schedules together; later fires are deferred (0: no limit)",
    )
    s.add_argument(
        "--tenant-schedule-fire-burst", type=POSITIVE, default=100.0, help="... in bursts of up to this many"
    )
    s.add_argument(
        "--schedule-min-interval",
        type=POSITIVE,
        default=1.0,
        help="seconds between two fires of one schedule at the closest; Create refuses a cron firing more often",
    )
    s.add_argument("--memory-mb", type=COUNT, default=512, help="sandbox memory limit per run")
    s.add_argument(
        "--cpu-seconds",
        type=POSITIVE,
        default=60.0,
        help="sandbox CPU time per step: between two host calls (a step attempt, or code between steps)",
    )
    s.add_argument("--wall-seconds", type=POSITIVE, default=3600.0, help="wall-clock limit of one wake-up")
    s.add_argument(
        "--max-step-timeout",
        type=POSITIVE,
        default=None,
        help="the longest time-out a step attempt gets, in seconds; a step asking for more is capped "
        "(default: the --wall-seconds value)",
    )
    s.add_argument(
        "--max-instance-state-mb",
        type=POSITIVE,
        default=32.0,
        help="step outputs one instance may store, in MiB; a step that would pass it fails for good",
    )
    s.add_argument(
        "--max-inbox-events",
        type=COUNT_OR_ZERO,
        default=1000,
        help="unread events one instance may hold; SendEvent past it fails with RESOURCE_EXHAUSTED (0: no cap)",
    )
    s.add_argument(
        "--max-inbox-mb",
        type=AMOUNT_OR_ZERO,
        default=16.0,
        help="... and their bytes (type and payload), in MiB (0: no cap)",
    )
    s.add_argument(
        "--max-concurrent-rpcs",
        type=COUNT_OR_ZERO,
        default=1024,
        help="gRPC calls in progress at once, Watch streams included; more fail fast with "
        "RESOURCE_EXHAUSTED (0: no cap)",
    )
    s.add_argument(
        "--max-rpcs-per-token",
        type=COUNT_OR_ZERO,
        default=512,
        help="calls and Watch streams one --auth-tokens token may have in progress; more fail fast with "
        "RESOURCE_EXHAUSTED before they are read (0: no cap)",
    )
    s.add_argument(
        "--max-rpcs-per-connection",
        type=COUNT_OR_ZERO,
        default=512,
        help="calls and Watch streams one client connection may have in progress (the budget that holds "
        "without --auth-tokens); more fail fast with RESOURCE_EXHAUSTED before they are read (0: no cap)",
    )
    s.add_argument(
        "--max-rpcs-per-tenant",
        type=COUNT_OR_ZERO,
        default=256,
        help="calls and Watch streams acting for one tenant in progress; more fail fast with "
        "RESOURCE_EXHAUSTED (0: no cap)",
    )
    s.add_argument(
        "--max-request-mb-in-flight",
        type=POSITIVE,
        default=256.0,
        help="MiB of request bodies being decoded and served at once, kernel-wide; more fail fast with "
        "RESOURCE_EXHAUSTED (one request alone always fits); also N / 16 MiB slots for bodies being "
        "received, a quarter per token",
    )
    s.add_argument(
        "--max-publish-mb-in-flight",
        type=POSITIVE,
        default=64.0,
        help="MiB of large Publish requests checked or queued at once; more fail fast with RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--sandbox-writable-dir",
        action="append",
        help="grant tenant code read-write access to this directory (repeatable; default: none)",
    )
    s.add_argument(
        "--sandbox-network",
        action="store_true",
        help="let tenant code open network connections (subprocess sandbox; wasm guests have no sockets)",
    )
    s.add_argument(
        "--warm-runners",
        type=COUNT_OR_ZERO,
        default=64,
        metavar="N",
        help="idle run processes the python sandbox keeps for returning tenants: a tenant's next wake-up of "
        "the same code version reuses one instead of a fresh process (never across tenants; 0: off)",
    )
    s.add_argument(
        "--warm-runner-idle-seconds",
        type=POSITIVE,
        default=10.0,
        help="how long an idle warm run process is kept without a wake-up",
    )
    s.add_argument(
        "--workspace-root",
        metavar="DIR",
        help="where steps' workspaces (ctx.workspace(): a writable tree of the instance's pinned code) "
        "live; python and python-wasm runtimes (default: none, ctx.workspace() is refused)",
    )
    s.add_argument(
        "--workspace-quota-mb",
        type=AMOUNT_OR_ZERO,
        default=1024.0,
        help="MiB a tenant's steps may write into its workspaces, checked when a step asks for one (0: no limit)",
    )
    s.add_argument(
        "--unsafe-allow-weak-sandbox",
        action="store_true",
        help="start the python sandbox even where a protection it needs (capability drop, no_new_privs, "
        "seccomp, network namespace, Landlock) is missing; each is logged as a WARNING. Not for production",
    )
    s.add_argument(
        "--max-log-lines-per-run",
        type=COUNT,
        default=1000,
        help="log lines kept per wake-up; the rest dropped",
    )
    s.add_argument(
        "--max-log-kib-per-run", type=POSITIVE, default=1024.0, help="log bytes kept per wake-up, in KiB"
    )
    s.add_argument(
        "--tenant-log-lines-rate",
        type=AMOUNT_OR_ZERO,
        default=200.0,
        help="log lines one tenant may keep per second across its wake-ups, bursts of 10 s (0: no limit)",
    )
    s.add_argument(
        "--tenant-log-kib-rate",
        type=AMOUNT_OR_ZERO,
        default=256.0,
        help="log KiB one tenant may keep per second across its wake-ups, bursts of 10 s (0: no limit)",
    )
    s.add_argument(
        "--log-flood-factor",
        type=POSITIVE,
        default=10.0,
        help="stop a wake-up that sends this many times its per-wake-up log budget (lines or bytes)",
    )
    s.add_argument(
        "--kv-max-keys",
        type=COUNT_OR_ZERO,
        default=100_000,
        help="keys one tenant may keep in its key-value store (ctx.kv, the KV service; 0: no limit)",
    )
    s.add_argument(
        "--kv-max-mb",
        type=AMOUNT_OR_ZERO,
        default=256.0,
        help="MiB (keys and values) one tenant may keep in its key-value store (0: no limit)",
    )
    s.add_argument(
        "--kv-max-value-kb", type=POSITIVE, default=64.0, help="the largest key-value value, in KiB of JSON"
    )
    s.add_argument(
        "--kv-max-writes-per-step",
        type=COUNT,
        default=1000,
        help="keys one step attempt may write (sent and committed with its result)",
    )
    s.add_argument(
        "--kv-max-reads-per-step",
        type=COUNT,
        default=10_000,
        help="ctx.kv and ctx.secrets reads one step attempt may make (each a round trip to the kernel)",
    )
    s.add_argument(
        "--secrets-key",
        metavar="FILE",
        help="seal tenants' secrets with the AES-256-GCM keys in FILE (base64, one a line: the first seals, "
        "all open; see `tenantflow secrets new-key`). Without it Secrets.Put is refused",
    )
    s.add_argument(
        "--retention-days",
        type=AMOUNT_OR_ZERO,
        default=30.0,
        help="delete instances this long after they complete, error or are terminated (0: keep forever)",
    )
    s.add_argument("--code-cache-entries", type=COUNT, default=256, help="loaded tenant code kept in memory")
    s.add_argument(
        "--code-cache-mb", type=POSITIVE, default=64.0, help="tenant source kept in memory, in MiB"
    )
    s.add_argument(
        "--code-cache-idle-seconds", type=POSITIVE, default=300.0, help="evict code unused this long"
    )
    s.add_argument(
        "--git-root",
        action="append",
        metavar="DIR|https://PREFIX",
        help="allow git refs under this directory or URL prefix ('{tenant}' = the tenant); repeatable",
    )
    s.add_argument(
        "--tls-cert", metavar="FILE", help="serve TLS only: PEM certificate chain (with --tls-key)"
    )
    s.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    s.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="require bearer tokens; FILE lists each token's SHA-256 and tenants (see `tenantflow token`)",
    )
    s.add_argument(
        "--metrics-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 picks a free one; default: off)",
    )
    s.add_argument(
        "--metrics-tenant-labels",
        type=COUNT_OR_ZERO,
        default=0,
        metavar="N",
        help="label metrics with the N most active tenants, the rest as 'other' (0: no tenant label)",
    )
    s.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one object per line on stderr"
    )
    s.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry traces to the OTLP collector of OTEL_EXPORTER_OTLP_ENDPOINT (needs tenantflow[otel]; "
        "also on when OTEL_* variables configure an exporter)",
    )
    s.set_defaults(func=run)
