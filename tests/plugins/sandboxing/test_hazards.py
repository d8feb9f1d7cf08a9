"""Determinism hazards in run(), found statically by the publish checker."""

from __future__ import annotations

import pytest

from tenantflow.plugins.sandboxing.pysource import python_inspection
from tests.helpers import source

HEAD = """
import datetime as dt
import os
import random as r
import time
import uuid
from datetime import datetime
from pathlib import Path
from tenantflow.workflow import WorkflowEntrypoint
"""


def kinds(body: str, sync: bool = False) -> list[tuple[int, str]]:
    head = "    def run(self, event, step):" if sync else "    async def run(self, event, step):"
    code = (
        source(HEAD)
        + "\nclass W(WorkflowEntrypoint):\n"
        + head
        + "\n"
        + "\n".join("        " + line for line in source(body).splitlines())
    )
    found = python_inspection({"wf.py": code.encode()})
    assert found.workflows == {"W": "wf"}
    first = len(source(HEAD).splitlines()) + 4  # the line of the body's first statement
    return [(w.line - first, w.kind) for w in found.warnings]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("t = time.time()", "clock"),
        ("t = datetime.now()", "clock"),
        ("t = dt.date.today()", "clock"),
        ("n = r.randint(1, 6)", "random"),
        ("b = os.urandom(8)", "random"),
        ("i = uuid.uuid4()", "uuid"),
        ("data = open('x').read()", "io"),
        ("text = Path('x').read_text()", "io"),
        ("home = os.getenv('HOME')", "io"),
        ("event.payload['seen'] = True", "event_mutation"),
        ("event.payload.append(1)", "event_mutation"),
        ("del event.payload['x']", "event_mutation"),
    ],
)
def test_each_hazard_outside_a_step_is_named_with_its_line(line: str, kind: str) -> None:
    assert kinds(f"x = 1\n{line}\nreturn 1") == [(1, kind)]


def test_a_step_name_built_from_a_hazard_is_named_too() -> None:
    found = kinds('await step.do(f"charge-{uuid.uuid4()}", lambda: 1)')
    assert (0, "dynamic_step_name") in found and (0, "uuid") in found


def test_hazards_inside_step_callbacks_and_plain_code_are_fine() -> None:
    assert (
        kinds(
            """
        stamp = await step.do("stamp", lambda: time.time())
        def roll():
            return r.random()
        n = await step.do("roll", roll)
        items = list(event.payload["items"])
        items.append(n)
        for i, item in enumerate(items):
            await step.do(f"item-{i}", lambda item=item: item)
        return [stamp, items]
        """
        )
        == []
    )


def test_a_sync_run_and_renamed_parameters_are_read_too() -> None:
    code = (
        source(HEAD)
        + "\nclass W(WorkflowEntrypoint):\n    def run(self, ev, s):\n        ev.payload['x'] = time.time()\n"
    )
    found = python_inspection({"wf.py": code.encode()})
    assert sorted(w.kind for w in found.warnings) == ["clock", "event_mutation"]


def test_a_workflow_like_class_without_run_is_named_as_ignored() -> None:
    code = (
        source(HEAD)
        + "\nclass Good(WorkflowEntrypoint):\n    def run(self, event, step):\n        return 1\n\nclass Forgot(WorkflowEntrypoint):\n    def go(self, event, step):\n        return 1\n"
    )
    found = python_inspection({"wf.py": code.encode()})
    assert found.workflows == {"Good": "wf"}
    (warning,) = found.warnings
    assert (
        warning.kind == "ignored_class" and "Forgot" in warning.message and "no run method" in warning.message
    )
