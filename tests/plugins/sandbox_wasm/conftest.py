"""In-process fixtures for the wasm sandboxes: a scripted Host and the sandboxes themselves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tenantflow.kernel.sandbox import Limits, RunExit
from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox

DEFAULT_LIMITS = Limits()


class ScriptedHost:
    """A kernel stand-in: runs every step at once and records every message."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(message)
        if message["op"] == "step":
            return {"do": "run", "attempt": 1} if message["kind"] == "do" else {"do": "return", "value": None}
        if message["op"] == "result":
            return (
                {"do": "return", "value": message["value"]}
                if message["ok"]
                else {"do": "raise", "error": message["error"]}
            )
        return {"do": "ack"}

    def admit(self, size: int) -> bool:
        return True

    async def notify(self, message: dict[str, Any]) -> None:
        self.notes.append(message)


def job(
    files: dict[str, bytes], module: str, workflow: str, payload: Any = None, journal: Any = ()
) -> dict[str, Any]:
    event = {"payload": payload, "instance_id": "i-1", "timestamp": "2025-01-01T00:00:00+00:00"}
    return {"files": files, "module": module, "workflow": workflow, "event": event, "journal": list(journal)}


def run(
    sandbox: Any, the_job: dict[str, Any], limits: Limits = DEFAULT_LIMITS
) -> tuple[RunExit, ScriptedHost, float]:
    """Run one job to its end; return how it ended, the host and the CPU seconds this process
    spent on it (CPU, not wall-clock: a busy machine slows the run but does not inflate this)."""
    host = ScriptedHost()
    started = time.process_time()
    exit_ = asyncio.run(sandbox.run(the_job, host, limits))
    return exit_, host, time.process_time() - started


@pytest.fixture(scope="session")
def python_wasm() -> Iterator[PythonWasmSandbox]:
    sandbox = PythonWasmSandbox(4)
    sandbox.runner()  # built/compiled once per machine, then loaded from the cache
    yield sandbox
    asyncio.run(sandbox.close())


@pytest.fixture(scope="session")
def raw_wasm() -> Iterator[RawWasmSandbox]:
    sandbox = RawWasmSandbox(4)
    yield sandbox
    asyncio.run(sandbox.close())
