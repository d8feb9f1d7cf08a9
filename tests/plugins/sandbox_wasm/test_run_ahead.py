"""python-wasm steps running ahead of their grant: one round trip a step, every message in order."""

from __future__ import annotations

import asyncio
from typing import Any

from tenantflow.kernel.sandbox import Limits
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tests.helpers import source
from tests.plugins.sandbox_wasm.conftest import ScriptedHost, job

WORKFLOW = source("""
    from tenantflow.workflow import WorkflowEntrypoint

    class Two(WorkflowEntrypoint):
        async def run(self, event, step):
            first = await step.do("first", lambda: print("inside first") or 1)
            return await step.do("second", lambda: first + 1)
""").encode()


class OrderedHost(ScriptedHost):
    """Records requests (once handled: it is slow) and notifications in the order it handled them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # a commit: the guest's later messages must wait for it
        self.seen.append(
            f"{message['op']}:{message.get('key', '')}:{'ahead' if message.get('ahead') else ''}"
        )
        return await super().call(message)

    async def notify(self, message: dict[str, Any]) -> None:
        self.seen.append(f"log:{message['line']}")
        await super().notify(message)


def _run(sandbox: PythonWasmSandbox, ahead: bool) -> OrderedHost:
    host = OrderedHost()
    exit_ = asyncio.run(
        sandbox.run({**job({"wf.py": WORKFLOW}, "wf", "Two"), "ahead": ahead}, host, Limits())
    )
    assert not exit_.crashed, exit_
    assert host.calls[-1] == {"op": "finish", "ok": True, "value": 2}
    return host


def test_new_steps_run_ahead_and_the_host_sees_every_message_in_order(python_wasm: PythonWasmSandbox) -> None:
    host = _run(python_wasm, ahead=True)
    assert host.seen == [
        "step:first#0:ahead", "log:inside first", "result:first#0:",
        "step:second#0:ahead", "result:second#0:", "finish::",
    ]  # fmt: skip


def test_steps_ask_first_when_the_kernel_grants_no_running_ahead(python_wasm: PythonWasmSandbox) -> None:
    host = _run(python_wasm, ahead=False)
    assert host.seen == [
        "step:first#0:", "log:inside first", "result:first#0:", "step:second#0:", "result:second#0:", "finish::",
    ]  # fmt: skip
