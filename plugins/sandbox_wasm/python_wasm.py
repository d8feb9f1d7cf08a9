"""``runtime = "python-wasm"``: tenant Python run by CPython compiled to WebAssembly.

One runner component (see :mod:`.build`) serves every tenant: it is built and compiled once per
machine, deserialized at kernel start, and instantiated fresh for every run (a new store: no
state survives a run, and a trap cannot poison the next one). The guest speaks the same step
protocol as the subprocess sandbox, through the imported WIT functions ``call`` and ``notify``,
and ``send``/``receive`` for a new step that runs ahead of its grant (one round trip a step).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wasmtime import Store, Trap, WasmtimeError
from wasmtime.component import Component, Linker

from tenantflow.kernel import workspace
from tenantflow.kernel.sandbox import Host, Inspection, Limits, RunExit
from tenantflow.plugins.sandbox_wasm import build, cache, tenant_files, waits
from tenantflow.plugins.sandbox_wasm.bridge import (
    Bridge,
    GuestStopped,
    current_bridge,
    guest_ended,
    run_guest,
)
from tenantflow.plugins.sandbox_wasm.pycheck import inspect_python_wasm
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import (
    POOL_RUNS,
    RUNNER_SHAPE,
    ThreadPerRun,
    limit_store,
    pooling_possible,
    shared_engine,
    trap_reason,
    wasi_config,
)
from tenantflow.plugins.sandboxing.pysource import decode_files

log = logging.getLogger("tenantflow.sandbox.wasm")
READY_TIMEOUT = 600.0


def _call(_store: Any, message: str) -> str:
    return current_bridge().call_text(message)


def _notify(_store: Any, message: str) -> None:
    current_bridge().notify_text(message)


def _send(_store: Any, message: str) -> None:
    current_bridge().send_text(message)


def _receive(_store: Any) -> str:
    return current_bridge().receive_text()


class _Build:
    """The runner compiled for one engine, with its linker and guest-wait shadows."""

    def __init__(self, pooling: bool, wasm: bytes) -> None:
        self.engine, self.ticker = shared_engine(pooling)
        self.component, self.cached = cache.compiled(self.engine, Component, wasm)
        self.linker = Linker(self.engine)
        self.linker.add_wasip2()
        self.waits = waits.shadow_preview2(self.engine, self.linker)  # sleeps the kernel can stop
        with self.linker.root() as root:
            root.add_func("call", _call)
            root.add_func("notify", _notify)
            root.add_func("send", _send)
            root.add_func("receive", _receive)


class Runner:
    """The compiled runner component, its linker and the stdlib modules it offers.

    Runs take the pooled build (see ``wasmtime_engine.POOL_RUNS``) while it has a free slot,
    and a build on on-demand allocation beyond that: same runner, same limits, more page faults."""

    def __init__(self) -> None:
        started = time.monotonic()
        wasm = build.ensure_runner()
        self.pooled = _Build(True, wasm)
        self.spare = _Build(False, wasm) if pooling_possible() else self.pooled
        self.engine, self.linker, self.component = (
            self.pooled.engine,
            self.pooled.linker,
            self.pooled.component,
        )
        self._slots = threading.BoundedSemaphore(POOL_RUNS)
        log.info(
            "python-wasm runner %s in %.2f s",
            "loaded" if self.pooled.cached else "compiled",
            time.monotonic() - started,
        )
        probe = json.loads(self.invoke(json.dumps({"probe": True}), 256 * 1024 * 1024, None))
        self.python: str = probe["python"]
        self.modules: frozenset[str] = frozenset(probe["modules"])

    def invoke(
        self,
        job: str,
        memory_bytes: int,
        bridge: Bridge | None,
        writable: Sequence[str] = (),
        preopens: Sequence[tuple[str, str]] = (),
    ) -> str:
        """Instantiate the runner in a fresh store and call ``run(job)`` (on the current thread);
        ``preopens``: this run's own (host path, guest path) directories."""
        pooled = self._slots.acquire(blocking=False)
        try:
            build_ = self.pooled if pooled else self.spare
            return self._invoke(build_, job, memory_bytes, bridge, writable, preopens)
        finally:
            if pooled:
                self._slots.release()  # _invoke freed the store: its slot is back in the pool

    def _invoke(
        self,
        runner: _Build,
        job: str,
        memory_bytes: int,
        bridge: Bridge | None,
        writable: Sequence[str],
        preopens: Sequence[tuple[str, str]],
    ) -> str:
        store = Store(runner.engine)
        try:
            limit_store(store, memory_bytes, RUNNER_SHAPE)
            # the kernel opens the grants; the guest works beneath them
            store.set_wasi(wasi_config(writable, preopens))
            if (writable or preopens) and (problem := tenant_files.io_threads_problem()):
                raise tenant_files.TenantFilesError(problem)
            if bridge is not None:
                bridge.budget.arm(store)
            else:
                store.set_epoch_deadline(1 << 62)
            runner.ticker.enter()
            try:
                with tenant_files.as_tenant():
                    runner.waits.begin_run(runner.linker, store)
                    instance = runner.linker.instantiate(store, runner.component)
                    run = instance.get_func(store, "run")
                    assert run is not None
                    result: str = run(store, job)
                return result
            finally:
                waits.end_run()
                runner.ticker.leave()
        finally:
            # Freed now, not when the last reference goes (a trap's traceback holds frames that
            # hold the store): the pooled slot is back before invoke gives the run's permit back.
            store.close()


class CodeCache:
    """Tenant modules' compiled code, marshalled by the guest and kept opaque here (never parsed
    in the kernel), by a digest of the module's path and source, least recently used first out.

    Safe to hand to any run of the same source: the guest compiles and reports it before any
    tenant code runs in its fresh store (the bridge takes it only as the run's first message), so
    the bytes are a function of the source and this runner alone."""

    def __init__(self, max_chars: int = 32 * 1024 * 1024) -> None:
        self._max_chars = max_chars
        self._chars = 0
        self._entries: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: str, source: str) -> str:
        return hashlib.sha256(f"{path}\0{source}".encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, keys: Mapping[str, str]) -> dict[str, str] | None:
        """Every path's code, or None if any is missing."""
        with self._lock:
            if not all(k in self._entries for k in keys.values()):
                return None
            for k in keys.values():
                self._entries.move_to_end(k)
            return {path: self._entries[k] for path, k in keys.items()}

    def put(self, keys: Mapping[str, str], message: Mapping[str, Any]) -> None:
        """Keep the code a guest reported for the paths this run asked about; ignore the rest."""
        code = message.get("code")
        if not isinstance(code, dict):
            return
        with self._lock:
            for path, blob in code.items():
                if path not in keys or not isinstance(blob, str) or keys[path] in self._entries:
                    continue
                self._entries[keys[path]] = blob
                self._chars += len(blob)
            while self._chars > self._max_chars and self._entries:
                self._chars -= len(self._entries.popitem(last=False)[1])


class PythonWasmSandbox:
    """The python-wasm sandbox; the runner is prepared on first use (see :meth:`_prepare`)."""

    runtime = "python-wasm"

    def __init__(self, max_runs: int = 64, writable: Sequence[str] = ()) -> None:
        self._writable = [str(Path(p).resolve()) for p in writable]
        self._pool = ThreadPerRun("tenantflow-python-wasm")  # max_runs: the dispatcher bounds runs
        self._runner: concurrent.futures.Future[Runner] | None = None
        self._lock = threading.Lock()
        self.codes = CodeCache()

    def _prepare(self) -> concurrent.futures.Future[Runner]:
        """Build (once per machine), compile and load the runner when something first needs it,
        on a daemon thread: a kernel that never runs python-wasm never pays for it, and a stopping
        kernel does not wait for it (:meth:`close` abandons a build in progress)."""
        with self._lock:
            if self._runner is None:
                future: concurrent.futures.Future[Runner] = concurrent.futures.Future()
                self._runner = future

                def prepare() -> None:
                    try:
                        future.set_result(Runner())
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                        future.set_exception(exc)

                threading.Thread(target=prepare, name="tenantflow-python-wasm-runner", daemon=True).start()
            return self._runner

    def runner(self, timeout: float = READY_TIMEOUT) -> Runner:
        """The prepared runner, waiting for it if needed (blocking)."""
        return self._prepare().result(timeout)

    def inspect(self, files: Mapping[str, bytes]) -> Inspection:
        return inspect_python_wasm(files, self.runner().modules)

    async def start(self) -> None:
        """Nothing to do yet: the runner is prepared by the first Publish or run that needs it."""

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        runner = await asyncio.wrap_future(self._prepare())
        job = dict(job)
        instance_dir = job.pop("workspace", None)  # the run sees its instance's directory, no other
        preopens = [(instance_dir, workspace.GUEST_DIR)] if isinstance(instance_dir, str) else []
        files = decode_files(job["files"])
        keys = {path: CodeCache.key(path, source) for path, source in files.items() if path.endswith(".py")}
        compiled = self.codes.get(keys)
        extra = {"compiled": compiled} if compiled is not None else {"report_compiled": True}
        guest_job = json.dumps({**job, "files": files, **extra})

        def execute(bridge: Bridge) -> RunExit:
            if compiled is None:
                bridge.on_compiled = lambda message: self.codes.put(keys, message)
            try:
                failure = runner.invoke(guest_job, limits.memory_bytes, bridge, self._writable, preopens)
            except (WasmtimeError, Trap, GuestStopped) as exc:
                return guest_ended(bridge, bridge.budget.reason or trap_reason(exc))
            except tenant_files.TenantFilesError as exc:
                return guest_ended(bridge, str(exc))
            if failure:
                return guest_ended(bridge, f"the python-wasm runtime failed: {failure}")
            return guest_ended(bridge, "the guest returned without reporting finish or suspend")

        return await run_guest(self._pool, execute, host, limits)

    async def close(self) -> None:
        build.abandon_builds()
        self._pool.shutdown(wait=False, cancel_futures=True)
