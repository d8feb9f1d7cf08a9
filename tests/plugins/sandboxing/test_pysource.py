"""Tenant Python is checked in a limited child: bad names, bad text and syntax errors are named."""

from __future__ import annotations

import pytest

from tenantflow.kernel.sandbox import CodeError
from tenantflow.plugins.sandboxing.pysource import decode_files, inspect_python

WORKFLOW = b"""
from tenantflow.workflow import WorkflowEntrypoint

class Pipeline(WorkflowEntrypoint):
    async def run(self, event, step):
        return 1

class Helper:
    pass
"""


def test_workflow_classes_are_found_by_their_run_method() -> None:
    files = {"pkg/flows.py": WORKFLOW, "pkg/__init__.py": b"", "notes.txt": b"not python"}
    assert inspect_python(files).workflows == {"Pipeline": "pkg.flows"}
    assert inspect_python(files, entry="pkg/__init__.py").workflows == {}


def test_a_syntax_error_names_its_file_and_line() -> None:
    with pytest.raises(CodeError, match=r"^bad\.py, line 2: "):
        inspect_python({"ok.py": WORKFLOW, "bad.py": b"x = 1\ndef (:\n"})


@pytest.mark.parametrize("name", ["", "/abs.py", "../up.py", "a//b.py", "./x.py"])
def test_bad_file_names_are_refused(name: str) -> None:
    with pytest.raises(CodeError, match="bad file name"):
        decode_files({name: b"x = 1"})


def test_sources_must_be_utf8_and_present() -> None:
    with pytest.raises(CodeError, match=r"latin\.py: not UTF-8 text"):
        decode_files({"latin.py": "caf\u00e9".encode("latin-1")})
    with pytest.raises(CodeError, match="no files"):
        decode_files({})
    with pytest.raises(CodeError, match=r"no \.py files"):
        inspect_python({"README": b"hi"})
