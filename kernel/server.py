"""The gRPC face of the kernel: thin servicers, one error mapping, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tenantflow.kernel import (
    children,
    codelist,
    egress,
    errors,
    metrics,
    rollback,
    schedules,
    tenantdata,
    upgrade,
)
from tenantflow.kernel.admission import ENVELOPE_BYTES, MIB, Budgets, BytesInFlight
from tenantflow.kernel.auth import CALLER, Tokens
from tenantflow.kernel.code import artifact_ref
from tenantflow.kernel.model import TERMINAL, HistoryEntry, InstanceRecord, ScheduleRecord, Status, StepRecord
from tenantflow.kernel.pages import LIGHT_RESPONSE_BYTES, read_page
from tenantflow.kernel.service import CreateSpec, ExportedHistory, Kernel, ListFilters
from tenantflow.kernel.tenantkv import KVEntry
from tenantflow.kernel.tenantlist import list_tenants
from tenantflow.kernel.validate import check_tenant, check_workflow
from tenantflow.v1 import tenantflow_pb2 as pb
from tenantflow.v1 import tenantflow_pb2_grpc as pb_grpc

log = logging.getLogger("tenantflow.server")
M = TypeVar("M", bound=Message)

STATUS_CODES: dict[type[errors.TenantflowError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def status_code(exc: errors.TenantflowError) -> grpc.StatusCode:
    """The one gRPC code for a kernel error (the most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.UNKNOWN


MAX_MESSAGE_BYTES = 1024  # of a status message; gRPC clients refuse trailers over 8-16 KiB
ECHO_PARAMS_BYTES = 16 * 1024 * 1024  # a CreateBatch with more params is answered without them
MAX_PAGE = 1000  # instances in one List page


def decode_request(message: Any, data: bytes) -> Any:
    """``message.FromString``, except that bytes which do not decode are InvalidArgument naming the
    field to blame (grpc.aio would answer UNKNOWN "DecodeError" and log a traceback)."""
    try:
        return message.FromString(data)
    except DecodeError as exc:
        raise errors.InvalidArgument(
            f"the request is not a valid {message.DESCRIPTOR.full_name}: "
            f"{_wire_problem(message.DESCRIPTOR, data) or exc}"
        ) from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise ValueError("a varint is cut short")


_LENGTH_DELIMITED = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}


def _wire_problem(descriptor: Descriptor, data: bytes, where: str = "") -> str | None:
    """Say which field of an undecodable request is wrong, for the caller's sake; None if no field is
    to blame. Request messages do not nest recursively, so neither does this."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            field = descriptor.fields_by_number.get(key >> 3)
            name = f"field '{where}{field.name}'" if field else f"unknown field number {key >> 3}"
            wire = key & 7
            if field is not None and (wire == 2) != (field.type in _LENGTH_DELIMITED):
                return f"{name} has wire type {wire}, which does not fit its type in the .proto"
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                if pos > len(data):
                    return f"{name} is cut short: the request holds fewer bytes than its length says"
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        return (
                            f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start}); string fields "
                            "must be UTF-8 text, so a lone UTF-16 surrogate cannot be sent: replace it, "
                            "or send binary data as base64"
                        )
                elif field is not None and field.message_type is not None:
                    inner = _wire_problem(field.message_type, chunk, f"{where}{field.name}.")
                    if inner:
                        return inner
            else:
                return f"{name} uses wire type {wire}, which this API does not use"
    except ValueError as exc:
        return f"the protobuf encoding is corrupt ({exc})"
    if pos > len(data):
        return "the request is cut short"
    return None


def status_message(exc: errors.TenantflowError) -> str:
    """The status message, cut to :data:`MAX_MESSAGE_BYTES` of UTF-8."""
    text = str(exc)
    if len(text.encode()) <= MAX_MESSAGE_BYTES:
        return text
    return text.encode()[: MAX_MESSAGE_BYTES - 20].decode("utf-8", "ignore") + "... (cut short)"


def _tenants(request: Any) -> list[str]:
    """The tenants a decoded request acts for."""
    if isinstance(request, pb.ListTenantsRequest):  # names none: filtered by the caller's grant
        return []
    if isinstance(request, pb.CreateBatchRequest):
        return sorted({r.tenant for r in request.requests})
    return [request.tenant]


class Caller(Protocol):
    """What admission reads of one call, whatever its transport (gRPC, or HTTP in
    :mod:`tenantflow.kernel.httpapi`)."""

    def metadata(self) -> Sequence[tuple[str, str | bytes]]: ...

    def peer(self) -> str: ...

    def declared_size(self) -> int | None:
        """The body's size in bytes if the transport says it before the body is read."""
        ...

    async def read(self) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class _GrpcCaller:
    """A gRPC call as :class:`Caller`: its size is known only once read (gRPC itself refuses a
    message over the server's largest limit from its length, unread)."""

    def __init__(self, message: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.message = message
        self.context = context

    def metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.context.invocation_metadata() or ()

    def peer(self) -> str:
        return str(self.context.peer())

    def declared_size(self) -> int | None:
        return None

    async def read(self) -> bytes:
        data = await self.context.read()
        if not isinstance(data, bytes):
            raise errors.InvalidArgument("the call ended before it sent its request message")
        return data

    def decode(self, data: bytes) -> Any:
        return decode_request(self.message, data)


def _release(exc: BaseException) -> None:
    """Free what the finished frames of a failed call hold (its body, decoded request, payload).
    grpc's abort makes a reference cycle of its error, this one and their frames, which only a
    full collection frees: 300 refused 1 MB SendEvents grew kernel RSS by 30-40 MiB and kept it."""
    traceback.clear_frames(exc.__traceback__)  # skips the frames still running
    exc.__traceback__ = None


class Gate:
    """Admits every tenantflow call before its body is read or decoded (see
    :mod:`tenantflow.kernel.admission`) and turns kernel errors into gRPC statuses with their
    message; anything else is INTERNAL. The one place that does either; the HTTP API admits its
    calls through :meth:`admit` too."""

    def __init__(
        self, budgets: Budgets, tokens: Tokens | None, busy: dict[str, Callable[[int], str]]
    ) -> None:
        self.budgets = budgets
        self.tokens = tokens
        self.busy = busy  # per Service/Method: why a body of this size is turned away now ("" if not)

    @contextlib.asynccontextmanager
    async def call(
        self, method: str, message: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[metrics.RpcCall]:
        """The admitted call, its decoded request in ``.request``, for the block."""
        service, _, name = method.rpartition("/")
        call = metrics.RpcCall()
        try:
            with metrics.rpc(f"tenantflow.v1.{service}", name, context, call) as rpc:
                try:
                    with contextlib.ExitStack() as held:
                        await self.admit(method, _GrpcCaller(message, context), held, rpc)
                        yield rpc
                except errors.TenantflowError as exc:
                    _release(exc)
                    await context.abort(status_code(exc), status_message(exc))
                except Exception as exc:
                    log.exception("%s failed", method)
                    _release(exc)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the kernel log")
        finally:  # the abort's cycle holds this call too
            call.request = call.response = None

    async def admit(
        self, method: str, caller: Caller, held: contextlib.ExitStack, rpc: metrics.RpcCall
    ) -> None:
        """Admit ``caller``'s call of ``method`` (``Service/Method``), holding its budgets in
        ``held`` and its decoded request in ``rpc.request``; a TenantflowError if refused. A body
        whose size the transport declares is measured before it is read."""
        budgets, grant = self.budgets, None
        peer = caller.peer()
        key, name = f"peer {peer}", f"connection {peer}"
        if self.tokens is not None:  # from metadata: a stranger's body is never read
            key, grant = self.tokens.authenticate(caller.metadata())
            name = f"token {grant.name or '(unnamed)'!r}"
            held.enter_context(budgets.per_token.hold(key, repr(grant.name or "(unnamed)")))
        CALLER.set(grant)
        held.enter_context(budgets.per_peer.hold(peer, peer))
        declared, data = caller.declared_size(), b""
        if declared is None:  # its size is known once it is in: read within a slot of the largest
            async with budgets.reads.hold(key, name):
                try:
                    data = await asyncio.wait_for(caller.read(), budgets.reads.deadline)
                except TimeoutError:
                    raise errors.ResourceExhausted(
                        f"the request body did not arrive within {budgets.reads.deadline:g} s of its read starting; "
                        "send it faster or in smaller requests"
                    ) from None
        size = len(data) if declared is None else declared
        held.enter_context(budgets.body(method, size))
        if (busy := self.busy.get(method)) and (reason := busy(size)):
            raise errors.ResourceExhausted(reason)
        rpc.request = caller.decode(data if declared is None else await caller.read())
        del data  # served from the decoded copy
        tenants = _tenants(rpc.request)
        if grant is not None:
            grant.authorize(tenants)
        for tenant in tenants:
            held.enter_context(budgets.per_tenant.hold(tenant, repr(tenant)))


def _when(text: str, field: str) -> float | None:
    """An RFC 3339 time of a request (None if empty); INVALID_ARGUMENT naming ``field`` if malformed."""
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidArgument(
            f"{field} {text[:64]!r} is not an RFC 3339 time, e.g. 2026-12-07T09:30:00Z"
        ) from None
    if when.tzinfo is None:
        raise errors.InvalidArgument(f"{field} {text[:64]!r} has no time zone: end it with Z or +HH:MM")
    # Times are shown to the microsecond, rounded: a bound given as an instance's shown created_at
    # must include it (after) or exclude it (before), whichever way its stored time was rounded.
    return when.timestamp() - 0.5e-6


def _ts(value: float | None) -> str:
    if not value:
        return ""
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat().replace("+00:00", "Z")


# The journal's internal step kinds, as the proto documents them for clients.
STEP_KINDS = {"do": "do", "sleep": "sleep", "wait": "wait_for_event", "wait_instance": "wait_for_instance",
              "undo": "rollback"}  # fmt: skip


def step_pb(step: StepRecord) -> pb.Step:
    occurrence = step.key.removesuffix(rollback.UNDO).rsplit("#", 1)[1]  # an undo: its forward step's
    return pb.Step(
        name=step.name, status=step.status, attempts=step.attempts, output_json=step.output_json,
        error=pb.Error(name=step.error_name, message=step.error_message, traceback=step.error_traceback)
        if step.error_name else None,
        kind=STEP_KINDS.get(step.kind, step.kind), occurrence=int(occurrence), wake_at=_ts(step.wake_at),
    )  # fmt: skip


def rollback_pb(record: InstanceRecord, steps: list[StepRecord]) -> pb.Rollback | None:
    rb = next((s for s in steps if s.key == rollback.KEY), None)
    if rb is None:
        return None
    state = rollback.state(rb)
    status = "stopped" if rb.status == "running" and record.status in TERMINAL else rb.status
    failed = (state.get("failed") or [{}])[0]
    error = None
    if failed:
        error = pb.Error(name=failed["name"], message=f"undo of step {failed['step']!r}: {failed['message']}")
    return pb.Rollback(status=status, reason=state.get("reason", ""), error=error)


def instance_pb(record: InstanceRecord, steps: list[StepRecord] | None = None) -> pb.Instance:
    steps = steps or []
    return pb.Instance(
        tenant=record.tenant, id=record.id, workflow=record.workflow, code=record.code,
        status=pb.Status.ValueType(int(record.status)), output_json=record.output_json,
        error=pb.Error(name=record.error_name, message=record.error_message, traceback=record.error_traceback)
        if record.error_name else None,
        steps=[step_pb(s) for s in steps if s.key not in (rollback.KEY, upgrade.PIN_KEY)], created_at=_ts(record.created_at),
        updated_at=_ts(record.updated_at), params_json=record.params_json, runtime=record.runtime,
        parent_id=record.parent, child_ids=children.child_ids(steps), rollback=rollback_pb(record, steps),
        concurrency_key=record.concurrency_key, concurrency_limit=record.concurrency_limit,
        pin_changes=[pb.PinChange(from_code=str(p["from"]), to_code=str(p["to"]), at=_ts(float(p["at"])))  # type: ignore[arg-type]
                     for p in upgrade.pin_changes(steps)],
    )  # fmt: skip


HISTORY_FORMAT = "tenantflow.history.v1"


def journal_entry_pb(step: StepRecord) -> pb.JournalEntry:
    return pb.JournalEntry(
        key=step.key, seq=step.seq, name=step.name, kind=step.kind, status=step.status, attempts=step.attempts,
        output_json=step.output_json, event_type=step.event_type, wake_at=_ts(step.wake_at),
        error=pb.Error(name=step.error_name, message=step.error_message, traceback=step.error_traceback)
        if step.error_name else None,
    )  # fmt: skip


def history_pb(exported: ExportedHistory) -> pb.History:
    return pb.History(
        format=HISTORY_FORMAT,
        instance=instance_pb(exported.record, exported.steps),
        journal=[journal_entry_pb(s) for s in exported.steps],
        events=[pb.InboxEvent(sequence=e.seq, type=e.type, payload_json=e.payload_json, at=_ts(e.created_at),
                              consumed_by=e.consumed_by) for e in exported.events],
        timeline=[watch_pb(h) for h in exported.timeline],
    )  # fmt: skip


def watch_pb(entry: HistoryEntry) -> pb.WatchEvent:
    child = ""
    if entry.kind in ("child_created", "child_ended"):
        child = str(json.loads(entry.data_json or "{}").get("child", ""))
    return pb.WatchEvent(
        sequence=entry.seq, at=_ts(entry.at), kind=entry.kind, status=pb.Status.ValueType(entry.status), step=entry.step,
        attempt=entry.attempt, message=entry.message, data_json=entry.data_json, child_id=child,
    )  # fmt: skip


def _spec(request: pb.CreateRequest) -> CreateSpec:
    return CreateSpec(
        workflow=request.workflow, code=request.code, id=request.id, params_json=request.params_json,
        concurrency_key=request.concurrency_key, concurrency_limit=request.concurrency_limit,
    )  # fmt: skip


class WorkflowsServicer(pb_grpc.WorkflowsServicer):
    """``tenantflow.v1.Workflows``."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        # Large instances being answered at once: a few bytes of request must not cost the kernel
        # unbounded memory (each answer holds the loaded steps, the message and its encoding).
        self.responses = BytesInFlight(4 * kernel.config.max_instance_state_bytes)

    def _instance(self, record: InstanceRecord, steps: list[StepRecord], held: bool = False) -> pb.Instance:
        """``instance_pb`` within the kernel's response budget and message limit, or ResourceExhausted."""
        size = sum(len(s.output_json) + len(s.error_message) + len(s.error_traceback) for s in steps)
        return self._bounded(size, "instance", repr(record.id), lambda: instance_pb(record, steps),
                             "; read its progress with Watch instead", held)  # fmt: skip

    def _budget(self, size: int | None, what: str) -> contextlib.AbstractContextManager[None]:
        """Hold ``size`` bytes of the response budget if they are many, or ResourceExhausted."""
        if size is None or size <= LIGHT_RESPONSE_BYTES:
            return contextlib.nullcontext()
        busy = (f"too many large {what}s are being read at once ({self.responses.used / MIB:.0f} MiB); "
                "retry in a few seconds")  # fmt: skip
        return self.responses.hold(size, busy)

    def _bounded(
        self, size: int, what: str, name: str, build: Callable[[], M], advice: str = "", held: bool = False
    ) -> M:
        """``build()``, a response holding ``size`` bytes of outputs, counted in the kernel's response
        budget while it is built when it is large (unless the caller ``held`` it already, from
        before the load), and refused past the response message limit."""
        with contextlib.nullcontext() if held else self._budget(size, what):
            message = build()
        limit = self.k.config.response_bytes_limit
        if (total := message.ByteSize()) > limit:
            raise errors.ResourceExhausted(
                f"{what} {name} is {total / MIB:.1f} MiB as a message, over the kernel's "
                f"{limit / MIB:g} MiB response limit{advice}"
            )
        return message

    async def Create(self, request: pb.CreateRequest, context: Any) -> pb.Instance:
        return instance_pb(await self.k.create(request.tenant, _spec(request)))

    async def CreateBatch(self, request: pb.CreateBatchRequest, context: Any) -> pb.CreateBatchResponse:
        if not request.requests:
            raise errors.InvalidArgument("a batch needs at least one request")
        tenants = {r.tenant for r in request.requests}
        if len(tenants) > 1:
            raise errors.InvalidArgument("all requests of a batch must name the same tenant")
        tenant = tenants.pop()
        records = await self.k.create_batch(tenant, [_spec(r) for r in request.requests])
        instances = [instance_pb(r) for r in records]
        if sum(len(r.params_json) for r in request.requests) > ECHO_PARAMS_BYTES:
            for instance in instances:  # the caller has them; 100 x 1 MiB would pass any client's limit
                instance.ClearField("params_json")
        return pb.CreateBatchResponse(instances=instances)

    async def Get(self, request: pb.InstanceRef, context: Any) -> pb.Instance:
        # Budgeted from the journal's size as storage counts it, before it is loaded: many
        # concurrent Gets of a 24 MB instance loaded 24 MB each first (96 of them: RSS +1,147 MiB).
        size = await self.k.steps_bytes(request.tenant, request.id)
        with self._budget(size, "instance"):
            view = await self.k.get(request.tenant, request.id)
            return self._instance(
                view.record, view.steps, held=size is not None and size > LIGHT_RESPONSE_BYTES
            )

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        if request.status not in Status._value2member_map_:
            raise errors.InvalidArgument(
                f"unknown status {request.status}: a tenantflow.v1.Status value, 0 for every status"
            )
        status = Status(request.status) if request.status else None
        if request.workflow:
            check_workflow(request.workflow)
        filters = ListFilters(request.workflow, _when(request.created_after, "created_after"),
                              _when(request.created_before, "created_before"))  # fmt: skip
        # A page is read in chunks that fit pages.LIST_PAGE_BYTES even if every instance carries the
        # largest params and output, and ends early once it holds that much: a page of 1,000
        # instances of 2 MiB each would be 2 GiB in memory, and past any client's message limit.
        if not 0 <= request.page_size <= MAX_PAGE:
            raise errors.InvalidArgument(
                f"page_size must be 0..{MAX_PAGE} (0 means 50), got {request.page_size}"
            )

        # A large page holds its bytes in the kernel's response budget as each chunk is read (96
        # Lists, 32 at once, of 16 MiB pages took kernel RSS +1,002 MiB); see pages.read_page.
        def read(limit: int, token: str) -> Awaitable[tuple[list[InstanceRecord], str]]:
            return self.k.list_instances(request.tenant, status, limit, token, filters)

        def size(r: InstanceRecord) -> int:
            return len(r.params_json) + len(r.output_json) + len(r.error_message) + len(r.error_traceback)

        worst = 2 * self.k.config.max_payload_bytes + ENVELOPE_BYTES
        async with read_page(
            self.responses, read, request.page_size or 50, request.page_token, worst, size, "lists"
        ) as (records, token):
            total = (
                await self.k.count_instances(request.tenant, status, filters) if request.include_count else 0
            )
            return pb.ListResponse(
                instances=[instance_pb(r) for r in records], next_page_token=token, total_count=total
            )

    async def Pause(self, request: pb.InstanceRef, context: Any) -> pb.Instance:
        return instance_pb(await self.k.pause(request.tenant, request.id))

    async def Resume(self, request: pb.InstanceRef, context: Any) -> pb.Instance:
        return instance_pb(await self.k.resume(request.tenant, request.id))

    async def Terminate(self, request: pb.TerminateRequest, context: Any) -> pb.Instance:
        await self.k.terminate(
            request.tenant, request.id, rollback=request.rollback, keep_children=request.keep_children
        )
        view = await self.k.get(request.tenant, request.id)
        return self._instance(view.record, view.steps)

    async def Delete(self, request: pb.InstanceRef, context: Any) -> pb.DeleteResponse:
        await self.k.delete(request.tenant, request.id)
        return pb.DeleteResponse()

    async def Restart(self, request: pb.RestartRequest, context: Any) -> pb.Instance:
        restarted = await self.k.restart(
            request.tenant, request.id, request.from_step, keep_events=request.keep_consumed_events
        )
        return instance_pb(restarted)

    async def SendEvent(self, request: pb.SendEventRequest, context: Any) -> pb.SendEventResponse:
        seq = await self.k.send_event(request.tenant, request.id, request.type, request.payload_json)
        return pb.SendEventResponse(sequence=seq)

    async def Watch(self, request: pb.InstanceRef, context: Any) -> AsyncIterator[pb.WatchEvent]:
        async for entry in self.k.watch(request.tenant, request.id):
            yield watch_pb(entry)

    async def ExportHistory(self, request: pb.InstanceRef, context: Any) -> pb.History:
        # Budgeted before the load; each output counts twice, as a history carries it twice (in its
        # instance's steps and in its journal): counted once, 96 exports of a 24 MB instance, 32 at
        # once, still took kernel RSS +615 MiB.
        counted = await self.k.history_bytes(request.tenant, request.id)
        counted = None if counted is None else 2 * counted
        with self._budget(counted, "history"):
            exported = await self.k.export_history(request.tenant, request.id)
            size = 2 * sum(len(s.output_json) for s in exported.steps) + sum(
                len(e.payload_json) for e in exported.events
            )
            held = counted is not None and counted > LIGHT_RESPONSE_BYTES
            return self._bounded(
                size, "history", f"of {request.id!r}", lambda: history_pb(exported), held=held
            )

    async def Upgrade(self, request: pb.UpgradeRequest, context: Any) -> pb.UpgradeResponse:
        outcomes = await self.k.upgrade(
            request.tenant, request.to_code, list(request.ids), request.workflow, request.dry_run
        )
        return pb.UpgradeResponse(instances=[
            pb.UpgradeOutcome(id=o.id, from_code=o.from_code, to_code=o.to_code, result=o.result, reason=o.reason,
                              step=o.step) for o in outcomes
        ])  # fmt: skip


class CodeServicer(pb_grpc.CodeServicer):
    """``tenantflow.v1.Code``."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    async def Publish(self, request: pb.PublishRequest, context: Any) -> pb.CodeVersion:
        published = await self.k.publish(
            request.tenant, request.name, request.runtime, dict(request.files), context.time_remaining(),
            strict=request.strict,
        )  # fmt: skip
        ref = published.ref
        newest, _ = await codelist.list_code(self.k.storage, request.tenant, request.name, 1, "")
        at = newest[0].created_at if newest and ref.endswith(newest[0].digest) else None
        warnings = [
            pb.CodeWarning(file=w.file, line=w.line, kind=w.kind, message=w.message)
            for w in published.warnings
        ]
        return pb.CodeVersion(
            ref=ref, runtime=published.runtime, workflows=published.workflows, name=request.name,
            published_at=_ts(at), warnings=warnings,
        )  # fmt: skip

    async def List(self, request: pb.ListCodeRequest, context: Any) -> pb.ListCodeResponse:
        found, token = await codelist.list_code(
            self.k.storage, request.tenant, request.name, request.page_size, request.page_token
        )
        versions = [pb.CodeVersion(ref=artifact_ref(v.tenant, v.name, v.digest), runtime=v.runtime,
                                   workflows=sorted(v.workflows), name=v.name, published_at=_ts(v.created_at))
                    for v in found]  # fmt: skip
        return pb.ListCodeResponse(versions=versions, next_page_token=token)


OVERLAP = {
    pb.OVERLAP_POLICY_UNSPECIFIED: "skip",
    pb.OVERLAP_POLICY_SKIP: "skip",
    pb.OVERLAP_POLICY_ALLOW: "allow",
}
CATCHUP = {pb.CATCHUP_POLICY_UNSPECIFIED: "skip", pb.CATCHUP_POLICY_SKIP: "skip",
           pb.CATCHUP_POLICY_RUN_ONCE: "run_once"}  # fmt: skip


def schedule_pb(s: ScheduleRecord) -> pb.Schedule:
    return pb.Schedule(
        tenant=s.tenant, name=s.name, cron=s.cron, time_zone=s.time_zone, workflow=s.workflow, code=s.code,
        params_json=s.params_json, overlap=pb.OVERLAP_POLICY_ALLOW if s.overlap == "allow" else pb.OVERLAP_POLICY_SKIP,
        catchup=pb.CATCHUP_POLICY_RUN_ONCE if s.catchup == "run_once" else pb.CATCHUP_POLICY_SKIP,
        catchup_window_seconds=round(s.catchup_window), paused=s.paused, next_fire=_ts(s.next_fire),
        last_fire=_ts(s.last_fire), last_instance_id=s.last_instance, fires=s.fires, skipped_fires=s.skipped,
        created_at=_ts(s.created_at), last_error=s.last_error,
        upcoming_fires=[] if s.paused else [_ts(t) for t in schedules.upcoming(s.cron, s.time_zone, time.time())],
    )  # fmt: skip


def schedule_record(request: pb.Schedule) -> ScheduleRecord:
    if request.overlap not in OVERLAP or request.catchup not in CATCHUP:
        raise errors.InvalidArgument(
            "unknown overlap or catchup policy: a tenantflow.v1 OverlapPolicy/CatchupPolicy value"
        )
    return ScheduleRecord(
        tenant=request.tenant, name=request.name, cron=request.cron, time_zone=request.time_zone,
        workflow=request.workflow, code=request.code, params_json=request.params_json,
        overlap=OVERLAP[request.overlap], catchup=CATCHUP[request.catchup],
        catchup_window=float(request.catchup_window_seconds or 60), paused=request.paused,
    )  # fmt: skip


class SchedulesServicer(pb_grpc.SchedulesServicer):
    """``tenantflow.v1.Schedules``."""

    def __init__(self, kernel: Kernel, responses: BytesInFlight | None = None) -> None:
        self.k = kernel
        # The kernel's response budget, shared with Workflows (large Gets, histories and lists).
        self.responses = responses or BytesInFlight(4 * kernel.config.max_instance_state_bytes)

    async def Create(self, request: pb.Schedule, context: Any) -> pb.Schedule:
        return schedule_pb(await self.k.create_schedule(schedule_record(request)))

    async def Get(self, request: pb.ScheduleRef, context: Any) -> pb.Schedule:
        check_tenant(request.tenant)
        return schedule_pb(await self.k.schedules.get(request.tenant, request.name))

    async def List(self, request: pb.ListSchedulesRequest, context: Any) -> pb.ListSchedulesResponse:
        check_tenant(request.tenant)
        if not 0 <= request.page_size <= 1000:
            raise errors.InvalidArgument(f"page_size must be 0..1000 (0 means 50), got {request.page_size}")

        # 1,000 schedules of 1 MiB params were one page (1 GiB); now chunks, 16 MiB and the budget.
        def read(limit: int, token: str) -> Awaitable[tuple[list[ScheduleRecord], str]]:
            return self.k.schedules.list(request.tenant, limit, token)

        def size(s: ScheduleRecord) -> int:
            return len(s.params_json) + len(s.last_error)

        worst = self.k.config.max_payload_bytes + ENVELOPE_BYTES
        async with read_page(
            self.responses, read, request.page_size or 50, request.page_token, worst, size, "schedule lists"
        ) as (found, token):
            return pb.ListSchedulesResponse(schedules=[schedule_pb(s) for s in found], next_page_token=token)

    async def Pause(self, request: pb.ScheduleRef, context: Any) -> pb.Schedule:
        check_tenant(request.tenant)
        return schedule_pb(await self.k.schedules.pause(request.tenant, request.name))

    async def Resume(self, request: pb.ScheduleRef, context: Any) -> pb.Schedule:
        check_tenant(request.tenant)
        return schedule_pb(await self.k.schedules.resume(request.tenant, request.name))

    async def Delete(self, request: pb.ScheduleRef, context: Any) -> pb.DeleteResponse:
        check_tenant(request.tenant)
        await self.k.schedules.delete(request.tenant, request.name)
        return pb.DeleteResponse()


class TenantsServicer(pb_grpc.TenantsServicer):
    """``tenantflow.v1.Tenants``."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    async def List(self, request: pb.ListTenantsRequest, context: Any) -> pb.ListTenantsResponse:
        found, token = await list_tenants(
            self.k.storage, self.k.config.list_tenants, CALLER.get(), request.prefix, request.page_size,
            request.page_token,
        )  # fmt: skip
        return pb.ListTenantsResponse(
            tenants=[pb.TenantSummary(tenant=t.tenant, instances=t.instances, live=t.live, schedules=t.schedules,
                                      code_versions=t.code_versions) for t in found],
            next_page_token=token,
        )  # fmt: skip


def kv_entry_pb(e: KVEntry) -> pb.KVEntry:
    return pb.KVEntry(key=e.key, value_json=e.value_json, updated_at=_ts(e.updated_at))


class KVServicer(pb_grpc.KVServicer):
    """``tenantflow.v1.KV``: a tenant's own key-value store (kernel/tenantdata.py)."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    async def Get(self, request: pb.KVKeyRef, context: Any) -> pb.KVEntry:
        return kv_entry_pb(await tenantdata.kv_get(self.k.storage, request.tenant, request.key))

    async def Put(self, request: pb.KVPutRequest, context: Any) -> pb.KVEntry:
        entry = await tenantdata.kv_put(
            self.k.storage, self.k.config, request.tenant, request.key, request.value_json
        )
        return kv_entry_pb(entry)

    async def Delete(self, request: pb.KVKeyRef, context: Any) -> pb.DeleteResponse:
        await tenantdata.kv_delete(self.k.storage, request.tenant, request.key)
        return pb.DeleteResponse()

    async def List(self, request: pb.KVListRequest, context: Any) -> pb.KVListResponse:
        entries, token, usage = await tenantdata.kv_list(
            self.k.storage, request.tenant, request.prefix, request.page_size, request.page_token
        )
        config = self.k.config
        return pb.KVListResponse(
            entries=[kv_entry_pb(e) for e in entries], next_page_token=token,
            usage=pb.KVUsage(keys=usage.keys, bytes=usage.bytes, max_keys=config.kv_max_keys,
                             max_bytes=config.kv_max_bytes),
        )  # fmt: skip


class SecretsServicer(pb_grpc.SecretsServicer):
    """``tenantflow.v1.Secrets``: values go in sealed; names and times come out, never a value."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    async def Put(self, request: pb.Secret, context: Any) -> pb.Secret:
        at = await tenantdata.secret_put(
            self.k.storage, self.k.config, request.tenant, request.name, request.value
        )
        return pb.Secret(tenant=request.tenant, name=request.name, updated_at=_ts(at))

    async def Delete(self, request: pb.SecretRef, context: Any) -> pb.DeleteResponse:
        await tenantdata.secret_delete(self.k.storage, request.tenant, request.name)
        return pb.DeleteResponse()

    async def List(self, request: pb.ListSecretsRequest, context: Any) -> pb.ListSecretsResponse:
        found = await tenantdata.secret_list(self.k.storage, request.tenant)
        secrets = [pb.Secret(tenant=request.tenant, name=name, updated_at=_ts(at)) for name, at in found]
        return pb.ListSecretsResponse(secrets=secrets)


class EgressServicer(pb_grpc.EgressServicer):
    """``tenantflow.v1.Egress``: where a tenant's steps may connect (kernel/egress.py)."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    async def Set(self, request: pb.EgressPolicy, context: Any) -> pb.EgressPolicy:
        raw = [(r.host, list(r.ports)) for r in request.rules]
        rules, at = await egress.put(self.k.storage, request.tenant, raw)
        return _egress_pb(request.tenant, rules, at)

    async def Get(self, request: pb.EgressRef, context: Any) -> pb.EgressPolicy:
        rules, at = await egress.get(self.k.storage, request.tenant)
        return _egress_pb(request.tenant, rules, at)


def _egress_pb(tenant: str, rules: list[egress.Rule], at: float | None) -> pb.EgressPolicy:
    return pb.EgressPolicy(tenant=tenant, rules=[pb.EgressRule(host=r.host, ports=r.ports) for r in rules],
                           updated_at=_ts(at))  # fmt: skip


def _unary(gate: Gate, method: str, message: Any, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with gate.call(method, message, context) as rpc:
            rpc.response = await behavior(rpc.request, context)
            return rpc.response

    return handle


def _stream(gate: Gate, method: str, message: Any, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with gate.call(method, message, context) as rpc:
            async for item in behavior(rpc.request, context):
                yield item

    return handle


def _add_service(server: grpc.aio.Server, name: str, servicer: Any, gate: Gate) -> None:
    """Register a tenantflow.v1 service as handlers of raw bytes: every RPC is declared
    request-streaming to gRPC, so the server reads no request until :class:`Gate` asks for the one
    a unary call sends (clients see the .proto's unary RPCs; on the wire the two are the same)."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        key, message = f"{name}/{method.name}", getattr(pb, method.input_type.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handle = _stream(gate, key, message, behavior)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(handle, None, serialize)
        else:
            handle = _unary(gate, key, message, behavior)
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(handle, None, serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def servicers(kernel: Kernel) -> dict[str, Any]:
    """The tenantflow.v1 servicers by service name; one set per kernel serves both transports, so
    they share its response budget."""
    workflows = WorkflowsServicer(kernel)
    return {"Workflows": workflows, "Code": CodeServicer(kernel),
            "Schedules": SchedulesServicer(kernel, workflows.responses), "Tenants": TenantsServicer(kernel),
            "KV": KVServicer(kernel), "Secrets": SecretsServicer(kernel),
            "Egress": EgressServicer(kernel)}  # fmt: skip


def new_gate(kernel: Kernel, budgets: Budgets, tokens: Tokens | None) -> Gate:
    return Gate(budgets, tokens, {"Code/Publish": kernel.catalog.publish_busy})


async def create_server(
    kernel: Kernel,
    address: str = "127.0.0.1:0",
    tokens: Tokens | None = None,
    tls: tuple[bytes, bytes] | None = None,
    budgets: Budgets | None = None,
    services: dict[str, Any] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started-to-be server bound to ``address``; returns it and the bound port (bind port 0 in tests).
    With ``tokens``, every tenantflow call is authorized (health and reflection stay open); with
    ``tls`` (PEM private key, PEM certificate chain) the port speaks TLS only; ``budgets``: what one
    caller may hold at once (default: ``tenantflow serve``'s defaults); ``services``: the
    :func:`servicers` to serve (default: a set of this server's own)."""
    config = kernel.config
    budgets = budgets or Budgets.of(config)
    # Calls past max_concurrent_rpcs fail fast with RESOURCE_EXHAUSTED instead of queuing memory;
    # a message over the largest RPC's limit is refused by gRPC from its length, unread.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", budgets.largest),
                                      ("grpc.max_send_message_length", config.response_bytes_limit),
                                      # A stream's window stays small until its body is asked for
                                      # (within a read slot): with BDP probing, gRPC widened it and took
                                      # waiting calls' bodies in anyway (32 x 15 MB: +250-317 MiB).
                                      ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)],
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)  # fmt: skip
    gate = new_gate(kernel, budgets, tokens)
    for name, servicer in (services or servicers(kernel)).items():
        _add_service(server, name, servicer, gate)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        pb.DESCRIPTOR.services_by_name[n].full_name
        for n in ("Workflows", "Code", "Schedules", "Tenants", "KV", "Secrets", "Egress")
    ]
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if port == 0:
        raise errors.Unavailable(f"cannot listen on {address}")
    return server, port
