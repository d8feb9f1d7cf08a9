"""Implementation of :class:`Client`."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from tenantflow.v1 import tenantflow_pb2 as pb
from tenantflow.v1 import tenantflow_pb2_grpc as pb_grpc


class Status(enum.IntEnum):
    """An instance's status: equal to the ``tenantflow.v1.Status`` number an ``Instance`` carries,
    and read as its name: ``str(Status(inst.status))`` is ``"waiting"``."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    ERRORED = 4
    TERMINATED = 5
    COMPLETE = 6
    WAITING = 7
    WAITING_FOR_PAUSE = 8

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def of(cls, value: Status | str | int) -> Status:
        """A status from its name (``"waiting"``, any case), number or :class:`Status`; ``ValueError``
        listing the names for anything else."""
        if isinstance(value, str):
            key = value.strip().upper().removeprefix("STATUS_").replace("-", "_")
            if key in cls.__members__ and key != "UNSPECIFIED":
                return cls[key]
            names = ", ".join(str(s) for s in cls if s)
            raise ValueError(f"unknown status {value!r}: one of {names}")
        return cls(int(value))


TERMINAL = frozenset({Status.COMPLETE, Status.ERRORED, Status.TERMINATED})


class TenantflowRpcError(Exception):
    """A failed call: ``code`` is the gRPC status code (``grpc.StatusCode.NOT_FOUND`` ...),
    ``message`` what the kernel said."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def status_name(status: int) -> str:
    """``STATUS_WAITING_FOR_PAUSE`` -> ``waiting_for_pause``."""
    return str(Status(status)) if status in Status._value2member_map_ else str(status)


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return _Details(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    """A call's details with our metadata added."""

    def __init__(self, details: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class Client:
    """Blocking client; every method raises :class:`TenantflowRpcError` on a failed call."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        tls_ca: bytes | None = None,
    ) -> None:
        """``token``: sent as ``authorization: Bearer`` on every call. ``tls``: connect with TLS,
        trusting the system's roots, or ``tls_ca`` (PEM) when given."""
        self.address = address
        self.timeout = timeout
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # fmt: skip
        if tls or tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        channel: grpc.Channel = self._channel
        if token:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self.workflows = pb_grpc.WorkflowsStub(channel)
        self.code = pb_grpc.CodeStub(channel)
        self.schedules = pb_grpc.SchedulesStub(channel)
        self.tenants = pb_grpc.TenantsStub(channel)
        self.kv = pb_grpc.KVStub(channel)
        self.secrets = pb_grpc.SecretsStub(channel)
        self.egress = pb_grpc.EgressStub(channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (``with Client(...)`` does it on exit)."""
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise TenantflowRpcError(exc.code(), exc.details() or "") from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the kernel accepts connections."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # -- code ---------------------------------------------------------------------------------------
    def publish(
        self,
        tenant: str,
        name: str,
        files: Mapping[str, str | bytes],
        runtime: str = "python",
        strict: bool = False,
    ) -> pb.CodeVersion:
        """Check and store tenant code; its ``warnings`` name determinism hazards and ignored
        classes (``strict``: refuse code with hazards instead, INVALID_ARGUMENT)."""
        encoded = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
        request = pb.PublishRequest(tenant=tenant, name=name, runtime=runtime, files=encoded, strict=strict)
        return self._call(self.code.Publish, request)  # type: ignore[no-any-return]

    def list_code(
        self, tenant: str, name: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListCodeResponse:
        """A page of the tenant's published versions (of ``name`` only, if given), newest first."""
        request = pb.ListCodeRequest(tenant=tenant, name=name, page_size=page_size, page_token=page_token)
        return self._call(self.code.List, request)  # type: ignore[no-any-return]

    def iter_code(self, tenant: str, name: str = "", page_size: int = 100) -> Iterator[pb.CodeVersion]:
        """Every published version of the tenant (of ``name`` only, if given), newest first."""
        token = ""
        while True:
            page = self.list_code(tenant, name, page_size, token)
            yield from page.versions
            token = page.next_page_token
            if not token:
                return

    # -- tenants (an operator's listing: the kernel must run with --list-tenants) --------------------
    def list_tenants(
        self, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListTenantsResponse:
        """A page of the tenants this token may see (names starting with ``prefix``), by name, with
        their counts; FAILED_PRECONDITION unless the kernel runs with ``--list-tenants``."""
        request = pb.ListTenantsRequest(prefix=prefix, page_size=page_size, page_token=page_token)
        return self._call(self.tenants.List, request)  # type: ignore[no-any-return]

    # -- a tenant's key-value store (what its steps keep with ctx.kv) and its secrets ---------------
    def kv_get(self, tenant: str, key: str) -> pb.KVEntry:
        """The entry stored under ``key`` (``json.loads(entry.value_json)``); NOT_FOUND when absent."""
        return self._call(self.kv.Get, pb.KVKeyRef(tenant=tenant, key=key))  # type: ignore[no-any-return]

    def kv_put(self, tenant: str, key: str, value: Any) -> pb.KVEntry:
        """Store ``value`` (anything JSON holds); RESOURCE_EXHAUSTED past the tenant's quota."""
        request = pb.KVPutRequest(tenant=tenant, key=key, value_json=json.dumps(value, allow_nan=False))
        return self._call(self.kv.Put, request)  # type: ignore[no-any-return]

    def kv_delete(self, tenant: str, key: str) -> None:
        """Delete ``key``; NOT_FOUND when absent."""
        self._call(self.kv.Delete, pb.KVKeyRef(tenant=tenant, key=key))

    def kv_list(
        self, tenant: str, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.KVListResponse:
        """A page of the tenant's keys under ``prefix``, in key order, with the tenant's usage."""
        request = pb.KVListRequest(tenant=tenant, prefix=prefix, page_size=page_size, page_token=page_token)
        return self._call(self.kv.List, request)  # type: ignore[no-any-return]

    def put_secret(self, tenant: str, name: str, value: str) -> pb.Secret:
        """Set secret ``name`` (the answer never holds the value); FAILED_PRECONDITION on a kernel
        without ``--secrets-key``."""
        return self._call(self.secrets.Put, pb.Secret(tenant=tenant, name=name, value=value))  # type: ignore[no-any-return]

    def delete_secret(self, tenant: str, name: str) -> None:
        """Delete secret ``name``; NOT_FOUND when absent."""
        self._call(self.secrets.Delete, pb.SecretRef(tenant=tenant, name=name))

    def list_secrets(self, tenant: str) -> list[pb.Secret]:
        """The tenant's secrets' names and times, by name; never their values."""
        return list(self._call(self.secrets.List, pb.ListSecretsRequest(tenant=tenant)).secrets)

    # -- egress ----------------------------------------------------------------------------------------
    def set_egress(self, tenant: str, rules: Sequence[tuple[str, Sequence[int]]]) -> pb.EgressPolicy:
        """Replace where ``tenant``'s steps may connect: ``(host, ports)`` pairs, a host being a name,
        ``*.suffix``, or an IP address or CIDR block; no rules: nowhere."""
        policy = pb.EgressPolicy(
            tenant=tenant, rules=[pb.EgressRule(host=h, ports=list(p)) for h, p in rules]
        )
        return self._call(self.egress.Set, policy)  # type: ignore[no-any-return]

    def get_egress(self, tenant: str) -> pb.EgressPolicy:
        """Where ``tenant``'s steps may connect now (no rules: nowhere)."""
        return self._call(self.egress.Get, pb.EgressRef(tenant=tenant))  # type: ignore[no-any-return]

    # -- instances ------------------------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        workflow: str,
        code: str,
        params: Any = None,
        id: str = "",
        *,
        concurrency_key: str = "",
        concurrency_limit: int = 0,
    ) -> pb.Instance:
        """``concurrency_limit`` N: at most N instances of ``workflow`` with ``concurrency_key`` run
        at once in the tenant; the rest wait queued, in order."""
        request = pb.CreateRequest(
            tenant=tenant, workflow=workflow, code=code, id=id, params_json=_json(params),
            concurrency_key=concurrency_key, concurrency_limit=concurrency_limit,
        )  # fmt: skip
        return self._call(self.workflows.Create, request)  # type: ignore[no-any-return]

    def create_batch(self, tenant: str, items: list[dict[str, Any]]) -> list[pb.Instance]:
        """``items``: dicts with ``workflow``, ``code``, optional ``params``, ``id``, ``concurrency_key``
        and ``concurrency_limit``."""
        requests = [
            pb.CreateRequest(tenant=tenant, workflow=i["workflow"], code=i["code"], id=i.get("id", ""),
                             params_json=_json(i.get("params")), concurrency_key=i.get("concurrency_key", ""),
                             concurrency_limit=i.get("concurrency_limit", 0))
            for i in items
        ]  # fmt: skip
        return list(
            self._call(self.workflows.CreateBatch, pb.CreateBatchRequest(requests=requests)).instances
        )

    # -- schedules ------------------------------------------------------------------------------------
    def create_schedule(
        self,
        tenant: str,
        name: str,
        cron: str,
        workflow: str,
        code: str,
        params: Any = None,
        *,
        time_zone: str = "",
        overlap: str = "skip",
        catchup: str = "skip",
        catchup_window: int = 0,
        paused: bool = False,
    ) -> pb.Schedule:
        """A cron schedule (5 fields, or 6 with seconds last) in ``time_zone`` (IANA; default UTC).
        ``overlap``: skip | allow; ``catchup``: skip | run_once, for fires missed (later than
        ``catchup_window`` seconds, default 60) while no kernel ran."""
        overlaps = {"skip": pb.OVERLAP_POLICY_SKIP, "allow": pb.OVERLAP_POLICY_ALLOW}
        catchups = {"skip": pb.CATCHUP_POLICY_SKIP, "run_once": pb.CATCHUP_POLICY_RUN_ONCE}
        if overlap not in overlaps or catchup not in catchups:
            raise ValueError("overlap is 'skip' or 'allow'; catchup is 'skip' or 'run_once'")
        request = pb.Schedule(
            tenant=tenant, name=name, cron=cron, time_zone=time_zone, workflow=workflow, code=code,
            params_json=_json(params), overlap=overlaps[overlap], catchup=catchups[catchup],
            catchup_window_seconds=catchup_window, paused=paused,
        )  # fmt: skip
        return self._call(self.schedules.Create, request)  # type: ignore[no-any-return]

    def get_schedule(self, tenant: str, name: str) -> pb.Schedule:
        """The schedule, with its next fires and last outcome; ``NOT_FOUND`` if there is none."""
        return self._call(self.schedules.Get, pb.ScheduleRef(tenant=tenant, name=name))  # type: ignore[no-any-return]

    def list_schedules(
        self, tenant: str, page_size: int = 0, page_token: str = ""
    ) -> pb.ListSchedulesResponse:
        """A page of the tenant's schedules, by name."""
        request = pb.ListSchedulesRequest(tenant=tenant, page_size=page_size, page_token=page_token)
        return self._call(self.schedules.List, request)  # type: ignore[no-any-return]

    def iter_schedules(self, tenant: str, page_size: int = 100) -> Iterator[pb.Schedule]:
        """Every schedule of the tenant, by name, page by page."""
        token = ""
        while True:
            page = self.list_schedules(tenant, page_size, token)
            yield from page.schedules
            token = page.next_page_token
            if not token:
                return

    def pause_schedule(self, tenant: str, name: str) -> pb.Schedule:
        """Stop firing until resumed (fires meanwhile are not made up)."""
        return self._call(self.schedules.Pause, pb.ScheduleRef(tenant=tenant, name=name))  # type: ignore[no-any-return]

    def resume_schedule(self, tenant: str, name: str) -> pb.Schedule:
        """Fire again from the next tick on."""
        return self._call(self.schedules.Resume, pb.ScheduleRef(tenant=tenant, name=name))  # type: ignore[no-any-return]

    def delete_schedule(self, tenant: str, name: str) -> None:
        """The instances it started are kept."""
        self._call(self.schedules.Delete, pb.ScheduleRef(tenant=tenant, name=name))

    # -- instances, read ------------------------------------------------------------------------------
    def get(self, tenant: str, id: str) -> pb.Instance:
        """The instance with its steps; an error tenant code raised carries its ``traceback``."""
        return self._call(self.workflows.Get, pb.InstanceRef(tenant=tenant, id=id))  # type: ignore[no-any-return]

    def children(self, tenant: str, id: str) -> list[pb.Instance]:
        """The instances ``id`` started with ``step.create``, in step order."""
        return [self.get(tenant, child) for child in self.get(tenant, id).child_ids]

    def list(
        self,
        tenant: str,
        status: Status | str | int = 0,
        page_size: int = 0,
        page_token: str = "",
        *,
        workflow: str = "",
        created_after: str = "",
        created_before: str = "",
        include_count: bool = False,
    ) -> pb.ListResponse:
        """A page of the tenant's instances, oldest first; ``status`` (a name such as ``"waiting"``,
        or a :class:`Status`), ``workflow`` and the RFC 3339 times ``created_after`` (inclusive) and
        ``created_before`` narrow it; ``include_count`` also counts every match (``total_count``).
        A filtered page may hold fewer than ``page_size``: page on while ``next_page_token`` is set."""
        wanted = Status.of(status) if status else Status.UNSPECIFIED
        status_value = pb.Status.ValueType(int(wanted))
        request = pb.ListRequest(
            tenant=tenant, status=status_value, page_size=page_size, page_token=page_token, workflow=workflow,
            created_after=created_after, created_before=created_before, include_count=include_count,
        )  # fmt: skip
        return self._call(self.workflows.List, request)  # type: ignore[no-any-return]

    def iter_instances(
        self, tenant: str, status: Status | str | int = 0, page_size: int = 100, *, workflow: str = ""
    ) -> Iterator[pb.Instance]:
        """Every instance of ``tenant`` (optionally with ``status``, of ``workflow``), page by page."""
        token = ""
        while True:
            page = self.list(tenant, status, page_size, token, workflow=workflow)
            yield from page.instances
            token = page.next_page_token
            if not token:
                return

    def pause(self, tenant: str, id: str) -> pb.Instance:
        """Pause a live instance at its next step boundary (a hibernating one at once)."""
        return self._call(self.workflows.Pause, pb.InstanceRef(tenant=tenant, id=id))  # type: ignore[no-any-return]

    def resume(self, tenant: str, id: str) -> pb.Instance:
        """Resume a paused instance (or cancel a pause not yet reached)."""
        return self._call(self.workflows.Resume, pb.InstanceRef(tenant=tenant, id=id))  # type: ignore[no-any-return]

    def terminate(
        self, tenant: str, id: str, *, rollback: bool = False, keep_children: bool = False
    ) -> pb.Instance:
        """End a live instance. ``rollback``: run the undos of its completed steps first (it ends
        terminated once they are done). Its live children are terminated too unless ``keep_children``."""
        request = pb.TerminateRequest(tenant=tenant, id=id, rollback=rollback, keep_children=keep_children)
        return self._call(self.workflows.Terminate, request)  # type: ignore[no-any-return]

    def delete(self, tenant: str, id: str) -> None:
        """Delete the instance and everything recorded for it (a live one is terminated first)."""
        self._call(self.workflows.Delete, pb.InstanceRef(tenant=tenant, id=id))

    def restart(
        self, tenant: str, id: str, from_step: str = "", *, keep_consumed_events: bool = False
    ) -> pb.Instance:
        """Run the instance again, from the start or from ``from_step``. The events the rerun steps
        consumed are spent (a rerun wait does not take the old approval again) unless
        ``keep_consumed_events``, which returns them to the inbox."""
        request = pb.RestartRequest(
            tenant=tenant, id=id, from_step=from_step, keep_consumed_events=keep_consumed_events
        )
        return self._call(self.workflows.Restart, request)  # type: ignore[no-any-return]

    def send_event(self, tenant: str, id: str, type: str, payload: Any = None) -> int:
        """Put an event in the instance's inbox (kept until a wait for ``type`` takes it); return its
        position in the inbox."""
        request = pb.SendEventRequest(tenant=tenant, id=id, type=type, payload_json=_json(payload))
        return int(self._call(self.workflows.SendEvent, request).sequence)

    def upgrade(
        self,
        tenant: str,
        to_code: str,
        ids: Sequence[str] = (),
        workflow: str = "",
        dry_run: bool = False,
    ) -> Sequence[pb.UpgradeOutcome]:
        """Move live instances (``ids``, or every live one of ``workflow``) to ``to_code``, each only
        if its journal replays cleanly on it; one outcome per instance (``dry_run``: report only)."""
        request = pb.UpgradeRequest(
            tenant=tenant, to_code=to_code, ids=ids, workflow=workflow, dry_run=dry_run
        )
        return tuple(self._call(self.workflows.Upgrade, request).instances)

    def export_history(self, tenant: str, id: str) -> pb.History:
        """The instance's journal, inbox and timeline (``json_format.MessageToJson`` of it is what
        ``tenantflow history export`` writes and ``tenantflow dev replay`` reads)."""
        return self._call(self.workflows.ExportHistory, pb.InstanceRef(tenant=tenant, id=id))  # type: ignore[no-any-return]

    def watch(self, tenant: str, id: str, timeout: float | None = None) -> Iterator[pb.WatchEvent]:
        """The instance's timeline from the start, then live, until it ends."""
        try:
            yield from self.workflows.Watch(pb.InstanceRef(tenant=tenant, id=id), timeout=timeout)
        except grpc.RpcError as exc:
            raise TenantflowRpcError(exc.code(), exc.details() or "") from None

    def wait(
        self, tenant: str, id: str, statuses: Iterable[Status | str | int] = TERMINAL, timeout: float = 60.0
    ) -> pb.Instance:
        """Poll until the instance reaches one of ``statuses`` (names such as ``"waiting"`` or
        :class:`Status` values; default: complete, errored or terminated) and return it; raise
        ``TimeoutError`` naming the last status."""
        wanted = {int(Status.of(s)) for s in statuses}
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            instance = self.get(tenant, id)
            if instance.status in wanted:
                return instance
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"instance {id!r} still {status_name(instance.status)} after {timeout:g} s"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    @staticmethod
    def output(instance: pb.Instance) -> Any:
        """The instance's return value, decoded."""
        return json.loads(instance.output_json) if instance.output_json else None
