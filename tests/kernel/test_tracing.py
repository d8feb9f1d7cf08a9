"""OpenTelemetry traces of a live kernel (``--otel``), exported by the SDK as JSON lines
(``TENANTFLOW_OTEL_EXPORTER=file:``): spans per RPC, per wake-up and per step attempt, continuing the
caller's ``traceparent``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tenantflow.kernel import tracing
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

WORKFLOW = """
from tenantflow.workflow import WorkflowEntrypoint

class Flaky(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("first", lambda: 1)
        def second(ctx):
            if ctx.attempt < 2:
                raise ConnectionError("try again")
            return 2
        return step.do("second", second, retries={"limit": 3, "delay": 0, "backoff": "constant"})
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_spans_per_rpc_wakeup_and_attempt_continue_the_callers_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "spans.jsonl"
    monkeypatch.setenv("TENANTFLOW_OTEL_EXPORTER", f"file:{out}")
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--otel"])
    k.start()
    try:
        with k.client() as client:
            ref = publish(client, "acme", WORKFLOW)
            request = pb.CreateRequest(tenant="acme", workflow="Flaky", code=ref, id="traced")
            client.workflows.Create(request, metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
            assert client.wait("acme", "traced").status == pb.STATUS_COMPLETE
        wait_for(lambda: any(s["name"] == "wakeup" for s in spans(out)), timeout=20)
    finally:
        k.stop()
    found = spans(out)
    traced = [s for s in found if s["trace_id"] == TRACE_ID]

    (create,) = [s for s in traced if s["name"] == "tenantflow.v1.Workflows/Create"]
    assert create["parent_span_id"] == PARENT_ID and create["kind"] == "SERVER"
    assert create["attributes"]["rpc.grpc.status_code"] == "OK"
    assert create["attributes"][tracing.ATTR_TENANT] == "acme"

    (wakeup,) = [s for s in traced if s["name"] == "wakeup"]
    assert wakeup["parent_span_id"] == create["span_id"]
    assert wakeup["attributes"][tracing.ATTR_TENANT] == "acme"
    assert wakeup["attributes"][tracing.ATTR_INSTANCE] == "traced"
    assert wakeup["attributes"]["tenantflow.outcome"] == "complete"

    attempts = sorted(
        (s for s in traced if s["name"].startswith("step ")),
        key=lambda s: (s["attributes"][tracing.ATTR_STEP], s["attributes"][tracing.ATTR_ATTEMPT]),
    )
    assert [(s["attributes"][tracing.ATTR_STEP], s["attributes"][tracing.ATTR_ATTEMPT], s["status"])
            for s in attempts] == [("first", 1, "UNSET"), ("second", 1, "ERROR"), ("second", 2, "UNSET")]  # fmt: skip
    for s in attempts:
        assert s["parent_span_id"] == wakeup["span_id"]
        assert s["attributes"][tracing.ATTR_INSTANCE] == "traced"
        assert wakeup["start"] <= s["start"] <= s["end"] <= wakeup["end"]

    # Calls without a traceparent start traces of their own.
    others = [s for s in found if s["name"] == "tenantflow.v1.Workflows/Get"]
    assert others and all(s["trace_id"] != TRACE_ID and s["parent_span_id"] is None for s in others)
    assert any(s["name"] == "tenantflow.v1.Code/Publish" for s in found)


def test_tracing_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TENANTFLOW_OTEL_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert not tracing.wanted(False) and tracing.wanted(True)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.wanted(False)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted(False)
    with tracing.rpc_span("/tenantflow.v1.Workflows/Get", [("traceparent", "junk")]) as span:
        assert span is None  # off: a no-op


def test_a_bad_exporter_setting_is_refused_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTFLOW_OTEL_EXPORTER", "http://somewhere")
    with pytest.raises(RuntimeError, match="expected file:<path>"):
        tracing.configure(True, "node")
    assert not tracing.enabled()
