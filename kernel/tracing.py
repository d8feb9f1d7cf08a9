"""Optional OpenTelemetry tracing: a span per RPC, per wake-up and per step attempt.

Off unless ``tenantflow serve --otel`` is given or the environment configures an exporter
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_TRACES_EXPORTER``), and
the ``otel`` extra (``pip install 'tenantflow[otel]'``) is installed. When off, every function here is
a cheap no-op. The standard ``OTEL_*`` variables (service name, sampler, endpoint, headers) apply.

A caller's W3C ``traceparent`` gRPC metadata is continued by its RPC's span. The kernel remembers the
trace of the last call that made an instance runnable (create, send-event, resume, restart), in
memory and bounded, and its wake-ups are children of that call's span: the platform's trace shows
the workflow's wake-ups and step attempts. A restarted kernel starts new traces for old instances.

``TENANTFLOW_OTEL_EXPORTER=file:<path>`` writes finished spans to ``path`` as JSON lines, one span a
line, as they end (for tests and for looking without a collector).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

ATTR_TENANT = "tenantflow.tenant"
ATTR_INSTANCE = "tenantflow.instance"
ATTR_STEP = "tenantflow.step"
ATTR_ATTEMPT = "tenantflow.attempt"
ATTR_NODE = "tenantflow.node"
ENV_EXPORTER = "TENANTFLOW_OTEL_EXPORTER"
_ENV_ASKS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
_FOLLOW_LIMIT = 10_000  # instances whose caller's trace is remembered (oldest forgotten first)

_tracer: Any = None  # an opentelemetry Tracer once configured
_provider: Any = None
_node = ""
_follow: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (tenant, id) -> SpanContext
_follow_lock = threading.Lock()


def enabled() -> bool:
    return _tracer is not None


def wanted(requested: bool) -> bool:
    """Whether tracing should be on: ``--otel``, or an exporter configured in the environment."""
    if requested or os.environ.get(ENV_EXPORTER):
        return True
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(name) for name in _ENV_ASKS)


def configure(requested: bool, node: str) -> str | None:
    """Turn tracing on if wanted; return where spans go (for the start-up log), or None when off.

    Raises ``RuntimeError`` saying what to install when tracing is asked for but unavailable."""
    global _tracer, _provider, _node
    if not wanted(requested):
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
    except ImportError:
        raise RuntimeError(
            "tracing needs the OpenTelemetry SDK: pip install 'tenantflow[otel]' (or drop --otel and "
            "the OTEL_* variables)"
        ) from None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "tenantflow"),
                                ATTR_NODE: node})  # fmt: skip
    provider = TracerProvider(resource=resource)
    target = os.environ.get(ENV_EXPORTER, "")
    exporter: SpanExporter
    if target:
        kind, _, path = target.partition(":")
        if kind != "file" or not path:
            raise RuntimeError(f"{ENV_EXPORTER}={target!r}: expected file:<path>")
        provider.add_span_processor(SimpleSpanProcessor(_json_lines_exporter(path)))
        where = f"spans to {path} (JSON lines)"
    elif os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        where = "spans to stdout"
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError(
                "tracing to an OTLP collector needs its exporter: pip install 'tenantflow[otel]'"
            ) from None
        exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        where = "spans to " + (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "the OTLP collector at localhost:4317"
        )
    _provider, _node = provider, node
    _tracer = provider.get_tracer("tenantflow.kernel")
    trace.set_tracer_provider(provider)  # so log records can name the current trace
    return where


def shutdown() -> None:
    """Flush and stop exporting (at kernel stop)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    with _follow_lock:
        _follow.clear()


# -- RPCs -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def rpc_span(method: str, metadata: Sequence[tuple[str, Any]] | None) -> Iterator[Any]:
    """A server span for one RPC, continuing the caller's ``traceparent``; yields the span (or None)."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    service, _, name = method.strip("/").rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    with _tracer.start_as_current_span(
        method.strip("/"), context=propagate.extract(carrier), kind=SpanKind.SERVER,
        attributes=attributes, record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        yield span


def rpc_ended(span: Any, code: str, tenant: str) -> None:
    """Record the RPC's outcome on its span."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code)
    if tenant:
        span.set_attribute(ATTR_TENANT, tenant)
    if code not in ("OK", "CANCELLED"):
        span.set_status(Status(StatusCode.ERROR, code))


def follow(span: Any, tenant: str, ids: Sequence[str]) -> None:
    """The next wake-ups of these instances join ``span``'s trace."""
    if span is None or not ids:
        return
    context = span.get_span_context()
    with _follow_lock:
        for id in ids:
            _follow[(tenant, id)] = context
            _follow.move_to_end((tenant, id))
        while len(_follow) > _FOLLOW_LIMIT:
            _follow.popitem(last=False)


def forget(tenant: str, id: str) -> None:
    """The instance ended: its trace is not continued any more."""
    if _tracer is not None:
        with _follow_lock:
            _follow.pop((tenant, id), None)


# -- wake-ups and step attempts ---------------------------------------------------------------------
def start_wakeup(tenant: str, id: str, workflow: str, runtime: str) -> Any:
    """A span for one wake-up (ended by :func:`end`), or None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    with _follow_lock:
        parent = _follow.get((tenant, id))
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
    return _tracer.start_span("wakeup", context=context, attributes={
        ATTR_TENANT: tenant, ATTR_INSTANCE: id, "tenantflow.workflow": workflow,
        "tenantflow.runtime": runtime, ATTR_NODE: _node,
    })  # fmt: skip


def start_attempt(parent: Any, tenant: str, id: str, step: str, attempt: int) -> Any:
    """A span for one step attempt, child of its wake-up's span."""
    if _tracer is None or parent is None:
        return None
    from opentelemetry import trace

    return _tracer.start_span(f"step {step}", context=trace.set_span_in_context(parent), attributes={
        ATTR_TENANT: tenant, ATTR_INSTANCE: id, ATTR_STEP: step, ATTR_ATTEMPT: attempt,
    })  # fmt: skip


def end(span: Any, outcome: str, error: str = "") -> None:
    """End a wake-up or attempt span with its outcome; ``error`` marks it failed."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("tenantflow.outcome", outcome)
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log records; None when none is recording."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _json_lines_exporter(path: str) -> Any:
    """A span exporter writing each finished span as one JSON object per line."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def __init__(self) -> None:
            self._file = open(path, "a", encoding="utf-8")  # closed at shutdown
            self._lock = threading.Lock()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            lines = [json.dumps(_span_dict(span), default=str) + "\n" for span in spans]
            with self._lock:
                if not self._file.closed:
                    self._file.write("".join(lines))
                    self._file.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            with self._lock:
                self._file.close()

    return JsonLines()


def _span_dict(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": span.kind.name,
        "start": (span.start_time or 0) / 1e9,
        "end": (span.end_time or 0) / 1e9,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }
