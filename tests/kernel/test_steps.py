"""Step semantics end to end: retries and back-off, time-outs, NonRetryableError, sleeps, events,
parallel steps, sync workflows and non-determinism detection."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

WORKFLOWS = """
import asyncio
import datetime
import time
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError, StepError, EventTimeoutError

def always_fails(ctx):
    raise ValueError(f"boom on attempt {ctx.attempt}")

class Backoff(WorkflowEntrypoint):
    async def run(self, event, step):
        policy = {"limit": 3, "delay": 0.2, "backoff": event.payload["backoff"]}
        try:
            await step.do("flaky", always_fails, retries=policy)
        except StepError as exc:
            return {"caught": exc.error_name, "message": exc.error_message}

class EventuallyOk(WorkflowEntrypoint):
    def run(self, event, step):
        def flaky(ctx):
            if ctx.attempt < 3:
                raise ConnectionError("try again")
            return f"ok after {ctx.attempt}"
        return step.do("flaky", flaky, retries={"limit": 5, "delay": 0.05, "backoff": "constant"})

class NoRetry(WorkflowEntrypoint):
    async def run(self, event, step):
        def refuse():
            raise NonRetryableError("card declined")
        await step.do("charge", refuse, retries={"limit": 5, "delay": 0.01})

class LimitZero(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("once", always_fails, retries={"limit": 0})

class Timeout(WorkflowEntrypoint):
    async def run(self, event, step):
        def slow():
            time.sleep(30)
        try:
            await step.do("slow", slow, retries={"limit": 1, "delay": 0}, timeout=0.5)
        except StepError as exc:
            return exc.error_name

class Sleeps(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("short", 0.3)
        wake = datetime.datetime.fromtimestamp(event.payload["until"], datetime.timezone.utc)
        await step.sleep_until("until", wake)
        return await step.do("after", lambda: "woke")

class Waits(WorkflowEntrypoint):
    async def run(self, event, step):
        try:
            got = await step.wait_for_event("approval", type="approve", timeout=event.payload["timeout"])
            return {"approved": got["payload"], "type": got["type"]}
        except EventTimeoutError as exc:
            return {"timed_out": str(exc)}

class Parallel(WorkflowEntrypoint):
    async def run(self, event, step):
        def work(n):
            def run():
                time.sleep(0.3)
                return n * n
            return run
        started = time.monotonic()
        results = await asyncio.gather(*(step.do(f"sq{n}", work(n)) for n in range(4)))
        return {"results": results, "took": time.monotonic() - started}

class Drift(WorkflowEntrypoint):
    async def run(self, event, step):
        # Non-deterministic on purpose: the step name depends on the clock.
        await step.do(f"stamp-{time.time_ns()}", lambda: 1)
        await step.sleep("pause", 0.2)
        return "unreachable"

class Crashy(WorkflowEntrypoint):
    def run(self, event, step):
        raise KeyError("no such order")
"""


@pytest.fixture
def ref(client: Client, tenant: str) -> str:
    return publish(client, tenant, WORKFLOWS)


def run(
    client: Client, tenant: str, ref: str, workflow: str, params: object = None, timeout: float = 30
) -> pb.Instance:
    inst = client.create(tenant, workflow, ref, params=params)
    return client.wait(tenant, inst.id, timeout=timeout)


@pytest.mark.parametrize(
    ("backoff", "factors"), [("constant", [1, 1, 1]), ("linear", [1, 2, 3]), ("exponential", [1, 2, 4])]
)
def test_retry_backoff(client: Client, tenant: str, ref: str, backoff: str, factors: list[int]) -> None:
    done = run(client, tenant, ref, "Backoff", {"backoff": backoff})
    assert done.status == pb.STATUS_COMPLETE, done.error
    assert Client.output(done) == {"caught": "ValueError", "message": "boom on attempt 4"}
    (flaky,) = done.steps
    assert (flaky.status, flaky.attempts, flaky.error.name) == (
        "failed",
        4,
        "ValueError",
    )  # limit 3 -> 4 tries
    retrying = [e for e in client.watch(tenant, done.id) if e.kind == "step_retrying"]
    delays = [json.loads(e.data_json)["wake_at"] - _epoch(e.at) for e in retrying]
    assert [round(d / 0.2) for d in delays] == factors
    failed = [e for e in client.watch(tenant, done.id) if e.kind == "step_failed"]
    assert [e.attempt for e in failed] == [1, 2, 3, 4]


def _epoch(at: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def test_retry_until_success_in_sync_workflow(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "EventuallyOk")
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == "ok after 3"
    assert done.steps[0].attempts == 3


def test_non_retryable_error_stops_at_once(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "NoRetry")
    assert done.status == pb.STATUS_ERRORED
    assert done.error.name == "StepError" and "card declined" in done.error.message
    assert (done.steps[0].attempts, done.steps[0].error.name) == (1, "NonRetryableError")


def test_limit_zero_means_one_attempt(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "LimitZero")
    assert done.status == pb.STATUS_ERRORED and done.steps[0].attempts == 1


def test_step_past_its_timeout_is_stopped_and_counts_as_an_attempt(
    client: Client, tenant: str, ref: str
) -> None:
    started = time.monotonic()
    done = run(client, tenant, ref, "Timeout")
    assert time.monotonic() - started < 10  # the 30 s sleeps were stopped
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == "StepTimeout"
    assert done.steps[0].attempts == 2 and "did not finish within 0.5 s" in done.steps[0].error.message


def test_sleep_and_sleep_until_hibernate(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Sleeps", ref, params={"until": time.time() + 1.0})
    waiting = client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_WAITING}))
    assert waiting.steps[0].kind == "sleep"
    done = client.wait(tenant, inst.id)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == "woke"
    assert [(s.name, s.kind, s.status) for s in done.steps] == [
        ("short", "sleep", "complete"),
        ("until", "sleep", "complete"),
        ("after", "do", "complete"),
    ]
    assert _epoch(done.updated_at) >= _epoch(done.created_at) + 1.0


def test_wait_for_event_delivers_payload(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Waits", ref, params={"timeout": "1 hour"})
    client.wait(tenant, inst.id, statuses=frozenset({pb.STATUS_WAITING}))
    client.send_event(tenant, inst.id, "other", {"ignored": True})
    client.send_event(tenant, inst.id, "approve", {"by": "alice"})
    done = client.wait(tenant, inst.id)
    assert Client.output(done) == {"approved": {"by": "alice"}, "type": "approve"}


def test_events_sent_before_the_wait_are_kept(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "Waits", ref, params={"timeout": "1 hour"})
    client.send_event(tenant, inst.id, "approve", {"early": True})  # possibly before the run even started
    done = client.wait(tenant, inst.id)
    assert Client.output(done) == {"approved": {"early": True}, "type": "approve"}


def test_wait_for_event_timeout_raises_into_the_workflow(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "Waits", {"timeout": 0.5})
    assert done.status == pb.STATUS_COMPLETE
    assert "no event of type 'approve'" in Client.output(done)["timed_out"]
    assert done.steps[0].status == "failed" and done.steps[0].error.name == "EventTimeoutError"


def test_parallel_steps_run_concurrently(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "Parallel")
    out = Client.output(done)
    assert out["results"] == [0, 1, 4, 9]
    assert out["took"] < 1.0  # four 0.3 s steps side by side, not 1.2 s in a row
    assert sorted(s.name for s in done.steps) == ["sq0", "sq1", "sq2", "sq3"]


def test_non_determinism_is_detected_and_named(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "Drift")
    assert done.status == pb.STATUS_ERRORED
    assert done.error.name == "NonDeterminismError"
    assert "stamp-" in done.error.message and "deterministic" in done.error.message


def test_workflow_exception_errors_the_instance(client: Client, tenant: str, ref: str) -> None:
    done = run(client, tenant, ref, "Crashy")
    assert done.status == pb.STATUS_ERRORED
    assert (done.error.name, done.error.message) == ("KeyError", "'no such order'")


def test_prints_outside_steps_are_logged_once_not_on_every_replay(client: Client, tenant: str) -> None:
    ref = publish(
        client,
        tenant,
        """
        from tenantflow.workflow import WorkflowEntrypoint

        class Chatty(WorkflowEntrypoint):
            async def run(self, event, step):
                print("starting")
                await step.do("one", lambda: print("inside one") or 1)
                await step.sleep("pause", 0.2)
                print("after the pause")
                await step.sleep("again", 0.2)
                return "done"
        """,
    )
    inst = client.create(tenant, "Chatty", ref)
    client.wait(tenant, inst.id)
    logs = [e.message for e in client.watch(tenant, inst.id) if e.kind == "log"]
    assert logs == ["starting", "inside one", "after the pause"]


def test_a_wake_up_past_its_wall_clock_limit_errors_instead_of_rerunning(tmp_path: Path) -> None:
    # --max-step-timeout (default: the wall limit) lets a step's own time-out outlast the wake-up limit
    kernel = KernelProcess(
        tmp_path / "kernel", [*TEST_LIMITS, "--wall-seconds", "1", "--max-step-timeout", "10"]
    )
    kernel.start()
    try:
        with kernel.client() as client:
            ref = publish(
                client,
                "walled",
                """
                import time
                from tenantflow.workflow import WorkflowEntrypoint

                class Stalls(WorkflowEntrypoint):
                    def run(self, event, step):
                        time.sleep(30)  # outside any step: no step time-out applies

                class LongStep(WorkflowEntrypoint):
                    def run(self, event, step):  # its own time-out outlasts the wake-up limit
                        return step.do("long", lambda: time.sleep(2) or "done", timeout=10, retries={"limit": 0})
                """,
            )
            inst = client.create("walled", "Stalls", ref)
            long = client.create("walled", "LongStep", ref)
            done = client.wait("walled", inst.id, timeout=20)
            assert done.status == pb.STATUS_ERRORED
            assert done.error.name == "SandboxCrash" and "1 s wall-clock limit" in done.error.message
            finished = client.wait("walled", long.id, timeout=20)
            assert finished.status == pb.STATUS_COMPLETE, finished.error.message
    finally:
        kernel.stop()
