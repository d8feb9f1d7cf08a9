"""A tenant's own tests of its CI pipeline workflow, with tenantflow.testing: no kernel to start.

Run them with ``pytest examples/ci_pipeline/tests`` (the project's CI runs them too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.testing import Event, WorkflowTester

PIPELINE = Path(__file__).parent.parent / "pipeline.py"
APPROVED = Event("deploy-approval", {"approved": True, "by": "ana"})


@pytest.fixture(scope="module")
def tester() -> Iterator[WorkflowTester]:
    with WorkflowTester(PIPELINE, secrets={"DEPLOY_TOKEN": "t0k3n-for-tests"}) as t:
        yield t


def test_it_deploys_once_approved(tester: WorkflowTester) -> None:
    run = tester.run("Pipeline", params={"repo": "acme/app"}, events=[APPROVED])
    assert run.status == "complete", run.error
    assert run.output["url"] == "https://app.example"
    assert run.output["approved_by"] == "ana"
    # the flaky test step failed once and was retried after its back-off (skipped, not waited for)
    assert run.step("test").attempts == 2
    assert run.step("test").errors == ["ConnectionError: test database not ready (flaky)"]
    assert [s.name for s in run.steps] == ["checkout", "lint", "test", "build", "approval", "deploy"]
    assert "step_retrying" in [e.kind for e in run.history]
    logged = [e.message for e in run.history if e.kind == "log"]
    assert any(line.endswith("with token ***") for line in logged), logged  # the secret is redacted


def test_a_rejected_deploy_fails_without_deploying(tester: WorkflowTester) -> None:
    rejected = Event("deploy-approval", {"approved": False, "by": "bo"})
    run = tester.run("Pipeline", params={"repo": "acme/app"}, events=[rejected])
    assert run.status == "errored"
    assert run.error == "NonRetryableError: deploy rejected by bo"
    assert "deploy" not in [s.name for s in run.steps]


def test_no_approval_times_out_after_24_hours_of_skipped_time(tester: WorkflowTester) -> None:
    run = tester.run("Pipeline", params={"repo": "acme/app"})
    assert run.status == "errored"
    assert run.error.startswith("EventTimeoutError")
    assert run.skipped_seconds >= 24 * 3600
