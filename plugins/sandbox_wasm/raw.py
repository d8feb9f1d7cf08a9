"""``runtime = "wasm"``: a module compiled from any language that speaks the guest ABI (``ABI.md``).

The bundle is one ``.wasm`` (or ``.wat``) file. Publish validates and compiles it (the compiled
code is cached on disk by digest); each run instantiates it in a fresh store limited as a whole
(one memory, one instance, bounded tables), an epoch-checked CPU budget and WASI with nothing granted (no environment, arguments or sockets,
no files but the operator's ``--sandbox-writable-dir`` directories), and calls the exported ``workflow_<Name>`` function.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wasmtime import (
    Caller,
    Engine,
    FuncType,
    Linker,
    Memory,
    MemoryType,
    Module,
    Store,
    Trap,
    ValType,
    WasmtimeError,
    wat2wasm,
)  # fmt: skip

from tenantflow.kernel.sandbox import CodeError, Host, Limits, RunExit
from tenantflow.plugins.sandbox_wasm import cache, rawcheck, tenant_files
from tenantflow.plugins.sandbox_wasm.abi import RawSession
from tenantflow.plugins.sandbox_wasm.bridge import (
    Bridge,
    GuestStopped,
    current_bridge,
    guest_ended,
    run_guest,
)
from tenantflow.plugins.sandbox_wasm.waits import shadow_preview1
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import (
    RAW_SHAPE,
    ThreadPerRun,
    limit_store,
    shared_engine,
    trap_reason,
    wasi_config,
)

PREFIX = "workflow_"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_WASI = "wasi_snapshot_preview1"
_sessions = threading.local()


def _session() -> RawSession:
    session: RawSession | None = getattr(_sessions, "session", None)
    if session is None:
        raise GuestStopped("no run is active on this thread")
    return session


def _memory(caller: Caller) -> Memory:
    memory = caller.get("memory")
    if not isinstance(memory, Memory):
        raise Trap("the module exports no memory named 'memory'")
    return memory


def _read(caller: Caller, ptr: int, length: int) -> bytes:
    memory = _memory(caller)
    current_bridge().check_size(length)  # before a byte of guest memory is copied
    if ptr < 0 or ptr + length > memory.data_len(caller):
        raise Trap(f"request [{ptr}, {ptr + length}) is outside linear memory")
    return bytes(memory.read(caller, ptr, ptr + length))


def _host_call(caller: Caller, ptr: int, length: int) -> int:
    session = _session()
    session.pending = session.handle(_read(caller, ptr & 0xFFFFFFFF, length))
    return len(session.pending)


def _host_reply(caller: Caller, ptr: int) -> None:
    session = _session()
    memory = _memory(caller)
    ptr &= 0xFFFFFFFF
    if ptr + len(session.pending) > memory.data_len(caller):
        raise Trap("reply buffer is outside linear memory")
    memory.write(caller, session.pending, ptr)


def _host_log(caller: Caller, ptr: int, length: int) -> None:
    bridge, size = current_bridge(), min(length, 8192)
    if size >= 0 and not bridge.admit(size):  # over the log budget: dropped unread
        return
    line = _read(caller, ptr & 0xFFFFFFFF, size).decode("utf-8", "replace")
    bridge.notify({"op": "log", "stream": "stdout", "line": line})


IMPORTS: dict[str, tuple[list[ValType], list[ValType]]] = {
    "call": ([ValType.i32(), ValType.i32()], [ValType.i32()]),
    "reply": ([ValType.i32()], []),
    "log": ([ValType.i32(), ValType.i32()], []),
}


def _linker(engine: Engine) -> Linker:
    linker = Linker(engine)
    linker.define_wasi()
    shadow_preview1(linker)  # sleeps and polls the kernel can stop
    for name, func in (("call", _host_call), ("reply", _host_reply), ("log", _host_log)):
        params, results = IMPORTS[name]
        linker.define_func("tenantflow", name, FuncType(params, results), func, access_caller=True)
    return linker


def module_bytes(path: str, data: bytes) -> bytes:
    """The binary module for a published ``.wasm`` or ``.wat`` file."""
    if path.endswith(".wat"):
        try:
            return bytes(wat2wasm(data.decode("utf-8")))
        except (UnicodeDecodeError, WasmtimeError) as exc:
            raise CodeError(f"{path}: not valid WebAssembly text: {trap_reason(exc)}") from None
    return data


class RawWasmSandbox:
    """Raw modules: validated and compiled at Publish, instantiated per run."""

    runtime = "wasm"

    def __init__(self, max_runs: int = 64, cached_modules: int = 256, writable: Sequence[str] = ()) -> None:
        self._writable = [str(Path(p).resolve()) for p in writable]
        self.engine, self.ticker = shared_engine()
        self.linker = _linker(self.engine)
        self._pool = ThreadPerRun("tenantflow-wasm")  # max_runs: the dispatcher bounds runs
        self._modules: OrderedDict[str, Module] = OrderedDict()
        self._capacity = cached_modules
        self._lock = threading.Lock()

    # -- code ---------------------------------------------------------------------------------
    def module(self, path: str, data: bytes) -> Module:
        """The compiled module for a bundle file (memory cache, then disk cache, then compile)."""
        wasm = module_bytes(path, data)
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            module = self._modules.get(digest)
            if module is not None:
                self._modules.move_to_end(digest)
                return module
        try:
            Module.validate(self.engine, wasm)
        except WasmtimeError as exc:
            raise CodeError(f"{path}: not a valid WebAssembly module: {trap_reason(exc)}") from None
        module, _ = cache.compiled(self.engine, Module, wasm)
        with self._lock:
            self._modules[digest] = module
            while len(self._modules) > self._capacity:
                self._modules.popitem(last=False)
        return module

    def inspect(self, files: Mapping[str, bytes]) -> dict[str, str]:
        """Checked in a limited child process (``rawcheck``), which also fills the disk cache."""
        return rawcheck.inspect_raw(files)

    def inspect_here(self, files: Mapping[str, bytes]) -> dict[str, str]:
        """What :meth:`inspect` does, in this process: only ever called in the checker's child."""
        paths = sorted(files)
        modules = [p for p in paths if p.endswith((".wasm", ".wat"))]
        if len(modules) != 1 or len(paths) != 1:
            raise CodeError(f"a 'wasm' bundle is exactly one .wasm (or .wat) module; got {paths}")
        path = modules[0]
        module = self.module(path, files[path])
        for imp in module.imports:
            self._check_import(path, imp.module, imp.name or "", imp.type)
        exports = {e.name: e.type for e in module.exports}
        if not isinstance(exports.get("memory"), MemoryType):
            raise CodeError(f"{path}: the module must export its linear memory as 'memory'")
        found: dict[str, str] = {}
        for name, kind in exports.items():
            if not name.startswith(PREFIX):
                continue
            workflow = name[len(PREFIX) :]
            if not _NAME.match(workflow) or not isinstance(kind, FuncType) or kind.params or kind.results:
                raise CodeError(f"{path}: export {name!r} must be a function () -> () named workflow_<Name>")
            found[workflow] = path
        try:
            self.linker.instantiate_pre(module)
        except WasmtimeError as exc:
            raise CodeError(f"{path}: cannot be linked: {trap_reason(exc)}") from None
        return found

    def _check_import(self, path: str, module: str, name: str, kind: Any) -> None:
        where = f"{path}: import {module}.{name}"
        if module == "tenantflow":
            expected = IMPORTS.get(name)
            if expected is None:
                raise CodeError(f"{where} is not part of the guest ABI (tenantflow.call, .reply, .log)")
            if not isinstance(kind, FuncType) or (
                [str(t) for t in kind.params],
                [str(t) for t in kind.results],
            ) != ([str(t) for t in expected[0]], [str(t) for t in expected[1]]):
                raise CodeError(f"{where} has the wrong signature (see ABI.md)")
            return
        if module == _WASI and self._wasi_defines(name):
            return
        raise CodeError(
            f"{where} is not provided: the wasm runtime offers only the tenantflow guest ABI and WASI "
            "preview 1 with no environment or network (files only where the operator grants them)"
        )

    def _wasi_defines(self, name: str) -> bool:
        try:
            self.linker.get(Store(self.engine), _WASI, name)
        except WasmtimeError:
            return False
        return True

    # -- runs ---------------------------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        path = job["module"]
        module = self.module(path, job["files"][path])
        workflow = job["workflow"]

        def execute(bridge: Bridge) -> RunExit:
            session = RawSession(job, bridge.call)
            _sessions.session = session
            store = Store(self.engine)
            limit_store(store, limits.memory_bytes, RAW_SHAPE)
            store.set_wasi(
                wasi_config(self._writable)
            )  # the kernel opens the grants; the guest works beneath
            if self._writable and (problem := tenant_files.io_threads_problem()):
                return guest_ended(bridge, problem)
            bridge.budget.arm(store)
            self.ticker.enter()
            instance = None
            try:
                with tenant_files.as_tenant():
                    instance = self.linker.instantiate(store, module)
                    func = instance.exports(store).get(PREFIX + workflow)
                    if func is None:
                        raise CodeError(f"{path} exports no workflow_{workflow}")
                    func(store)  # type: ignore[operator]
                session.complete(workflow)
            except tenant_files.TenantFilesError as exc:
                return guest_ended(bridge, str(exc))
            except (WasmtimeError, Trap, GuestStopped) as exc:
                detail = bridge.budget.reason or trap_reason(exc)
                return guest_ended(bridge, _with_memory(detail, instance, store, limits))
            finally:
                self.ticker.leave()
                _sessions.session = None
            return guest_ended(bridge, "the module returned without reporting finish or suspend")

        return await run_guest(self._pool, execute, host, limits)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _with_memory(detail: str, instance: Any, store: Store, limits: Limits) -> str:
    """Add how full the memory was when a trap happened near the cap (a memory bomb, usually)."""
    if instance is None:
        return detail
    memory = instance.exports(store).get("memory")
    if not isinstance(memory, Memory):
        return detail
    used, cap = memory.data_len(store), limits.memory_bytes
    if used * 2 < cap:
        return detail
    mib = 1024 * 1024
    return f"{detail} (memory limit: the module had grown to {used // mib} MiB of its {cap // mib} MiB cap)"
