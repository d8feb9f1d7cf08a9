"""The contracts stay what the docs say: error codes, hook documentation, the public SDK surface."""

from __future__ import annotations

import inspect
from pathlib import Path

import grpc

import tenantflow.workflow
from tenantflow.kernel import errors, hookspecs
from tenantflow.kernel.server import STATUS_CODES, status_code

ROOT = Path(__file__).parents[2]


def test_every_error_class_maps_to_exactly_one_code() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.TenantflowError) and c is not errors.TenantflowError
    ]  # fmt: skip
    assert set(classes) == set(STATUS_CODES)
    assert len(set(STATUS_CODES.values())) == len(STATUS_CODES)
    for cls in classes:
        assert status_code(cls("x")) == STATUS_CODES[cls]
    assert status_code(errors.TenantflowError("x")) == grpc.StatusCode.UNKNOWN


def test_every_hook_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    hooks = [
        name
        for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("tenantflow_")
    ]
    assert hooks
    for name in hooks:
        assert f"`{name}(" in readme, f"hook {name} is not documented in README.md"
        assert inspect.getdoc(getattr(hookspecs, name)), f"hook {name} has no docstring"


def test_the_tenant_sdk_surface_is_pinned() -> None:
    assert sorted(tenantflow.workflow.__all__) == [
        "BlockingStep",
        "ErrorInfo",
        "EventTimeoutError",
        "InstanceError",
        "NonDeterminismError",
        "NonRetryableError",
        "RetryPolicy",
        "RollbackConfig",
        "RollbackContext",
        "Step",
        "StepContext",
        "StepError",
        "WorkflowEntrypoint",
        "WorkflowEvent",
        "WorkflowStep",
        "parse_duration",
    ]
