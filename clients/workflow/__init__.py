"""The tenant SDK: what a tenant's workflow code imports.

```python
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError

class Pipeline(WorkflowEntrypoint):
    async def run(self, event, step):
        sha = await step.do("checkout", lambda: checkout(event.payload["repo"]))
        await step.sleep("cool down", "10 seconds")
        return await step.do("deploy", deploy, retries={"limit": 3, "delay": "5 seconds"})
```

The determinism contract: ``run`` is re-executed from the top every time the instance wakes
(after a sleep, an event, a retry delay, a crash or a kernel restart). Completed steps are not
re-run: ``step.do`` returns the recorded result. Code *outside* steps runs again on every replay,
so it must be deterministic — build state only from ``event`` and step results, never from the
clock, randomness or I/O outside a step, and do not mutate ``event``. Steps are matched by name and
occurrence (the second ``step.do("x")`` is a different step from the first). A replay that asks for
steps the journal did not record, while recorded steps remain unasked, fails the instance with
:class:`NonDeterminismError` naming the step expected and the step asked for.

Step callbacks may take one argument, a :class:`StepContext` (``name``, ``attempt``, ``count``).
Step results, the workflow's return value and event payloads are JSON values. Annotate ``step`` as
:class:`WorkflowStep` (``async def run``) or :class:`BlockingStep` (``def run``) for completion.

Composition: ``await step.create("child", "Other", params=...)`` starts an instance of the same
tenant and returns its id (durably); ``await step.wait_for_instance("joined", id)`` hibernates until
it ends and returns its output or raises :class:`InstanceError`. ``step.do(name, fn, rollback=undo)``
registers an undo that runs, in reverse step-start order, if ``run`` raises or the instance is
terminated with rollback; it receives a :class:`RollbackContext` (``output``, ``error``, ``ctx``).
"""

from tenantflow.workflow._api import (
    BlockingStep,
    ErrorInfo,
    EventTimeoutError,
    InstanceError,
    NonDeterminismError,
    NonRetryableError,
    RetryPolicy,
    RollbackConfig,
    RollbackContext,
    Step,
    StepContext,
    StepError,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStep,
)
from tenantflow.workflow._durations import parse_duration

__all__ = [
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
