"""The python-wasm sandbox: Publish checks, limits, cancellation and logs (in-process and via a kernel)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.sandbox import CodeError, Limits
from tenantflow.plugins.sandbox_wasm.pycheck import check_imports
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tests.helpers import publish, source
from tests.plugins.sandbox_wasm.conftest import ScriptedHost, job, run

WORKFLOW = source("""
    import time
    from tenantflow.workflow import WorkflowEntrypoint

    class Spin(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("spin", self.spin)

        def spin(self):
            while True:
                pass

    class Talk(WorkflowEntrypoint):
        async def run(self, event, step):
            print("hello", event.payload)
            return await step.do("answer", lambda: 42)
""").encode()


def test_publish_names_the_unavailable_module(client: Client, tenant: str) -> None:
    code = "import json\nfrom tenantflow.workflow import WorkflowEntrypoint\nimport sqlite3\n\nclass W:\n    def run(self, event, step): ...\n"
    with pytest.raises(
        TenantflowRpcError,
        match=r"wf.py, line 3: module 'sqlite3' is not available in the python-wasm runtime",
    ):
        publish(client, tenant, code, runtime="python-wasm")
    publish(client, tenant, code, runtime="python")  # the subprocess sandbox has the whole stdlib


def test_dynamic_import_fails_with_a_clear_error(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, """
        import importlib
        class W:
            def run(self, event, step):
                return step.do("load", lambda: importlib.import_module("sqlite3").__name__, retries={"limit": 0})
    """, runtime="python-wasm")  # fmt: skip
    done = client.wait(tenant, client.create(tenant, "W", ref).id, timeout=30)
    assert "'sqlite3' is not available in the python-wasm runtime" in done.error.message


def test_guarded_and_own_imports_pass_the_check() -> None:
    check_imports({
        "wf.py": "try:\n    import sqlite3\nexcept ImportError:\n    sqlite3 = None\nimport helpers.util\nimport json\n",
        "helpers/__init__.py": "", "helpers/util.py": "from decimal import Decimal\n",
    }, frozenset({"json", "decimal"}))  # fmt: skip
    with pytest.raises(CodeError, match="helpers/util.py, line 1: module 'xml.dom'"):
        check_imports({"helpers/util.py": "import xml.dom\n"}, frozenset({"xml"}))


def test_cpu_limit_stops_an_infinite_loop_within_a_tick(python_wasm: PythonWasmSandbox) -> None:
    exit_, host, cpu = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Spin"), Limits(cpu_seconds=0.2))
    assert exit_.crashed and "CPU limit exceeded (0.2 s of CPU per step)" in exit_.detail
    assert cpu < 0.2 + 0.5  # the limit, plus instantiation and a tick or two of slack
    assert [m["op"] for m in host.calls] == ["step"]


def test_cancelling_a_run_stops_the_guest_promptly(python_wasm: PythonWasmSandbox) -> None:
    async def scenario() -> float:
        task = asyncio.create_task(
            python_wasm.run(job({"wf.py": WORKFLOW}, "wf", "Spin"), ScriptedHost(), Limits())
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.2


def test_prints_become_log_lines_and_the_run_finishes(python_wasm: PythonWasmSandbox) -> None:
    exit_, host, _ = run(python_wasm, job({"wf.py": WORKFLOW}, "wf", "Talk", payload={"x": 1}))
    assert not exit_.crashed
    assert host.notes == [{"op": "log", "stream": "stdout", "line": "hello {'x': 1}"}]
    assert host.calls[-1] == {"op": "finish", "ok": True, "value": 42}


def test_guest_is_cpython_with_the_sdk(python_wasm: PythonWasmSandbox) -> None:
    runner = python_wasm.runner()
    assert runner.python.startswith("3.")
    assert {"asyncio", "json", "tenantflow.workflow", "decimal"} <= runner.modules
    assert "sqlite3" not in runner.modules
