"""SIGTERM stops a kernel within a few seconds whatever it is doing, and loses nothing committed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

PROMPT = 5.0  # seconds a stop may take

LONG = """
from tenantflow.workflow import WorkflowEntrypoint
import time

class Long(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("first", lambda: 1)
        step.do("slow", lambda: time.sleep(30) or 2, timeout="60 seconds")
        return "done"
"""

WASM = """
from tenantflow.workflow import WorkflowEntrypoint

class W(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: 1)
"""


def _terminate_timed(kernel: KernelProcess) -> float:
    assert kernel.proc is not None
    started = time.monotonic()
    kernel.proc.send_signal(signal.SIGTERM)
    kernel.proc.wait(30)
    took = time.monotonic() - started
    kernel.stop()  # closes the output pipe
    return took


def _builders() -> list[int]:
    """Processes building a python-wasm runner (componentize-py)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"componentize" in cmdline:
                found.append(int(pid))
    return found


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "wasm-cache"
    cache.mkdir()
    monkeypatch.setenv("TENANTFLOW_WASM_CACHE", str(cache))
    return cache


def test_a_fresh_kernel_with_an_empty_cache_stops_at_once(tmp_path: Path, empty_cache: Path) -> None:
    kernel = KernelProcess(tmp_path / "k", TEST_LIMITS)
    kernel.start()
    took = _terminate_timed(kernel)
    assert took < PROMPT, f"stopping took {took:.1f} s"
    assert not any("building the python-wasm runner" in line for line in kernel.lines), kernel.lines
    assert list(empty_cache.iterdir()) == [] or not any(p.suffix == ".wasm" for p in empty_cache.iterdir())


def test_sigterm_abandons_a_runner_build_in_progress(tmp_path: Path, empty_cache: Path, tenant: str) -> None:
    kernel = KernelProcess(tmp_path / "k", TEST_LIMITS)
    kernel.start()
    errors: list[BaseException] = []

    def publish_wasm() -> None:
        try:
            with kernel.client() as client:
                publish(client, tenant, WASM, runtime="python-wasm")
        except BaseException as exc:  # noqa: BLE001 - the kernel goes away mid-call
            errors.append(exc)

    caller = threading.Thread(target=publish_wasm, daemon=True)
    caller.start()
    wait_for(lambda: any("building the python-wasm runner" in line for line in kernel.lines), timeout=30)
    took = _terminate_timed(kernel)
    assert took < PROMPT, f"stopping during a runner build took {took:.1f} s"
    caller.join(10)
    wait_for(lambda: not _builders(), timeout=5)
    assert not any(p.suffix == ".wasm" for p in empty_cache.iterdir()), "a half-built runner was cached"


def test_sigterm_during_a_step_and_a_watch_is_prompt_and_loses_nothing(tmp_path: Path, tenant: str) -> None:
    kernel = KernelProcess(tmp_path / "k", TEST_LIMITS)
    kernel.start()
    with kernel.client() as client:
        ref = publish(client, tenant, LONG)
        inst = client.create(tenant, "Long", ref)
        wait_for(lambda: any(s.name == "slow" for s in client.get(tenant, inst.id).steps))
        watched: list[pb.WatchEvent] = []
        watcher = threading.Thread(
            target=lambda: watched.extend(_safe_watch(client, tenant, inst.id)), daemon=True
        )
        watcher.start()
        wait_for(lambda: len(watched) > 0 or watcher.is_alive())
        took = _terminate_timed(kernel)
        watcher.join(10)
    assert took < PROMPT, f"stopping with a running step and an open Watch took {took:.1f} s"
    assert not watcher.is_alive(), "the Watch stream did not end with the kernel"

    kernel.start()  # same data directory: the committed first step is kept, the slow one runs again
    with kernel.client() as client:
        steps = {s.name: s for s in client.get(tenant, inst.id).steps}
        assert steps["first"].status == "complete" and steps["first"].attempts == 1
    kernel.stop()


def _safe_watch(client: Client, tenant: str, id: str) -> list[pb.WatchEvent]:
    events: list[pb.WatchEvent] = []
    try:
        for event in client.watch(tenant, id):
            events.append(event)
    except Exception:  # noqa: BLE001 - the stream ends with the kernel
        pass
    return events
