"""The proto's comments are the contract for clients in other languages: every enum-like string the
kernel sends is one the proto documents, and every documented step kind is sent."""

from __future__ import annotations

import re
from pathlib import Path

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish, wait_for

PROTO = Path(__file__).parents[2] / "proto" / "tenantflow" / "v1" / "tenantflow.proto"

CODE = """
from tenantflow.workflow import WorkflowEntrypoint, StepError

def fails(ctx):
    raise ValueError("no")

class Everything(WorkflowEntrypoint):
    def run(self, event, step):
        print("hello")
        step.do("one", lambda: 1)
        try:
            step.do("bad", fails, retries={"limit": 1, "delay": 0.05})
        except StepError:
            pass
        step.sleep("nap", 0.05)
        step.wait_for_instance("joined", step.create("child", "Child"))
        got = step.wait_for_event("go", type="go", timeout="1 hour")
        return got["payload"]

class Child(WorkflowEntrypoint):
    def run(self, event, step):
        return 1
"""


def documented(message: str, field: str) -> set[str]:
    """The ``a | b | c`` list in the comment of ``field`` in ``message`` (same line or the line above)."""
    text = PROTO.read_text()
    body = re.search(r"message " + message + r" \{(.*?)\n\}", text, re.S)
    assert body, f"message {message} not found in {PROTO}"
    lines = body.group(1).splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\bstring " + field + r" = \d+;", line):
            comment = line.split("//", 1)[1] if "//" in line else lines[i - 1].split("//", 1)[1]
            return {word.strip() for word in comment.split("|")}
    raise AssertionError(f"{message}.{field} not found")


def test_step_and_watch_strings_are_the_documented_ones(client: Client, tenant: str) -> None:
    kinds, statuses = documented("Step", "kind"), documented("Step", "status")
    watch_kinds = documented("WatchEvent", "kind")
    assert kinds == {"do", "sleep", "wait_for_event", "create", "wait_for_instance", "rollback"}
    kinds -= {"rollback"}  # sent for undos: tests/kernel/test_rollbacks.py

    ref = publish(client, tenant, CODE)
    inst = client.create(tenant, "Everything", ref)
    wait_for(lambda: any(s.name == "go" for s in client.get(tenant, inst.id).steps))
    waiting = client.get(tenant, inst.id)
    client.send_event(tenant, inst.id, "go", {"fine": True})
    done = client.wait(tenant, inst.id)
    assert done.status == pb.STATUS_COMPLETE, done
    assert Client.output(done) == {"fine": True}

    seen_kinds = {s.kind for s in done.steps}
    assert seen_kinds == kinds, f"kinds sent {seen_kinds}, documented {kinds}"
    seen_statuses = {s.status for s in [*done.steps, *waiting.steps]}
    assert seen_statuses <= statuses, f"undocumented step status: {seen_statuses - statuses}"
    assert {"complete", "failed", "waiting"} <= seen_statuses
    events = list(client.watch(tenant, inst.id))
    seen_watch = {e.kind for e in events}
    assert seen_watch <= watch_kinds, f"undocumented watch kinds: {seen_watch - watch_kinds}"
    assert {
        "status",
        "step_started",
        "step_completed",
        "step_failed",
        "sleeping",
        "waiting",
        "event",
        "log",
    } <= (seen_watch)
