"""README's plugin section documents every hook, every contract method and every harness method a
plugin author writes (datasette's habit): a new one without a line there fails here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from tenantflow.conformance import harness
from tenantflow.kernel import hookspecs
from tenantflow.kernel.loader import Loader
from tenantflow.kernel.sandbox import Host, Sandbox
from tenantflow.kernel.storage import Storage

README = Path(__file__).parents[2] / "README.md"
CONTRACTS = [Storage, Sandbox, Host, Loader]
HARNESSES = [harness.StorageHarness, harness.SandboxHarness, harness.LoaderHarness, harness.LoaderSource]


def plugin_section() -> str:
    text = README.read_text()
    start = text.index("\n## Writing a plugin\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def public_methods(cls: type) -> list[str]:
    return [n for n, m in vars(cls).items() if not n.startswith("_") and inspect.isfunction(m)]


def documented(name: str, section: str) -> bool:
    return re.search(rf"`{re.escape(name)}[(`]", section) is not None


def test_every_hook_is_in_the_plugin_section() -> None:
    hooks = [n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("tenantflow_")]
    assert len(hooks) >= 4
    section = plugin_section()
    assert [h for h in hooks if not documented(h, section)] == []


@pytest.mark.parametrize("cls", CONTRACTS + HARNESSES, ids=lambda cls: cls.__name__)
def test_every_method_a_plugin_implements_is_in_the_plugin_section(cls: type) -> None:
    methods = public_methods(cls)
    assert methods, cls
    section = plugin_section()
    assert [m for m in methods if not documented(m, section)] == [], f"{cls.__name__}: add a line to README"


def test_the_check_can_fail() -> None:
    assert not documented("tenantflow_no_such_hook", plugin_section())
    assert not documented("put_artifact", "put_artifact(artifact) without backticks")
