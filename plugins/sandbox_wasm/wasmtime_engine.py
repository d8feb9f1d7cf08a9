"""The one wasmtime Engine both wasm sandboxes share, and each run's CPU/wall/stop budget on it.

Epoch interruption, not fuel: a ticker thread advances the engine's epoch every :data:`TICK`
seconds while any run is active. Every store's deadline is one tick away, and its deadline
callback decides each time: carry on, or trap with a reason (CPU limit, wall-clock limit, stopped
by the kernel). So a runaway guest is stopped within a tick of its limit, and the kernel can
stop one guest from another thread without touching the others. Epochs do not interrupt a host
call, so guest waits (WASI sleep/poll, see :mod:`.waits`) wait on :meth:`Budget.wait_until`,
which the same limits and :meth:`Budget.stop` end.

The engine has only the WebAssembly features the guest ABI and the python-wasm runner need:
no multiple memories, threads/shared memory, 64-bit memory, GC or exceptions, so a store's
limits (:func:`limit_store`) bound everything a guest can allocate.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar

from wasmtime import Config, Engine, ExitTrap, Store, Trap, WasiConfig
from wasmtime import _ffi as ffi  # the deadline callback has no public wrapper in wasmtime-py 50

TICK = 0.01
T = TypeVar("T")
WASMTIME_VERSION = version("wasmtime")
ENGINE_TAG = f"wasmtime-{WASMTIME_VERSION}-epoch-mvp"  # compiled artifacts depend on both
WAIT_SLICE = 0.25  # a waiting guest re-checks its limits at least this often (stop() wakes it at once)

# Proposals the guests do not need, turned off: each is a way to allocate outside the one memory
# the store limits count (several memories, shared memory, GC heaps) or attack surface.
_FEATURES_OFF = (
    "wasm_multi_memory", "wasm_threads", "shared_memory", "wasm_memory64", "wasm_gc", "gc_support",
    "wasm_function_references", "wasm_exceptions", "wasm_stack_switching", "wasm_custom_page_sizes",
    "wasm_wide_arithmetic",
)  # fmt: skip

_CONTINUE = 0
_Callback = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_context_t), ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ffi.wasmtime_update_deadline_kind_t),
)  # fmt: skip
_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))


class _Ticker:
    """Advances the engine's epoch while runs are active; sleeps otherwise."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._active = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name="tenantflow-wasm-epoch", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._active == 0:
                    self._cond.wait()
            time.sleep(TICK)
            self._engine.increment_epoch()

    def enter(self) -> None:
        with self._cond:
            self._active += 1
            self._cond.notify()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1


_lock = threading.Lock()
_shared: dict[bool, tuple[Engine, _Ticker]] = {}


def shared_engine(pooling: bool = False) -> tuple[Engine, _Ticker]:
    """The process-wide engine (epoch interruption on) and its ticker; with ``pooling``, the one on
    the pooling allocator (the python-wasm runner's: see :func:`_pooling`). Raw modules keep
    on-demand allocation: a tenant's module whose tables or memory exceed the pool's slots would
    fail to compile there, where the store limits fail it with a clear error."""
    with _lock:
        if pooling not in _shared:
            config = Config()
            config.epoch_interruption = True
            config.cranelift_opt_level = "speed"
            for feature in _FEATURES_OFF:
                setattr(config, feature, False)
            engine = _pooled_engine(config) if pooling else Engine(config)
            _shared[pooling] = (engine, _Ticker(engine))
        return _shared[pooling]


# The pooling allocator: every store's memory, tables and instances come from slots reserved once
# per process, and a freed slot is reset in place for the next store: its first
# POOL_KEEP_RESIDENT bytes by memset and a copy of the memory image, the rest decommitted. So a
# run maps nothing and takes ~5 page faults where on-demand allocation took ~1,000, for a copy of
# the image when its store is freed (loadtests/bench_python_wasm.py: ~1 ms less CPU a wake-up).
# A slot that was used stays resident (~17 MiB), so the pool has POOL_RUNS slots only; runs
# beyond them use on-demand allocation (python_wasm.Runner). The store limits (limit_store) still
# bound each run exactly: the slots only bound what any store could reach.
POOL_RUNS = 4
POOL_MEMORY_BYTES = 4 << 30  # all a 32-bit memory can address (64-bit memories are off)
POOL_KEEP_RESIDENT = 32 << 20  # the runner touches ~17 MiB of its memory in a P4 wake-up


def _pooling(config: Config) -> None:
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        for setter, value in (
            ("total_component_instances", 2 * POOL_RUNS),  # a run: the runner and the waits helper
            ("total_core_instances", 32 * POOL_RUNS),  # RUNNER_SHAPE.instances
            ("total_memories", POOL_RUNS),
            ("total_tables", 4 * POOL_RUNS),
            ("max_core_instances_per_component", 32),
            ("max_memories_per_component", 1),
            ("max_memories_per_module", 1),
            ("max_tables_per_component", 4),  # RUNNER_SHAPE.tables
            ("max_tables_per_module", 4),
            ("table_elements", 1 << 16),  # RUNNER_SHAPE.table_elements
            ("max_memory_size", POOL_MEMORY_BYTES),
            ("linear_memory_keep_resident", POOL_KEEP_RESIDENT),
            ("table_keep_resident", 1 << 20),
            ("max_unused_warm_slots", POOL_RUNS),
        ):
            getattr(ffi, f"wasmtime_pooling_allocation_config_{setter}_set")(pool, value)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)


def pooling_possible() -> bool:
    """Whether this process may reserve the pool's address space (~16 GiB, reserved, not
    committed): not under an ``RLIMIT_AS`` (the code checker's children run under one), since
    wasmtime aborts the process when it cannot make an engine."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft == resource.RLIM_INFINITY


def _pooled_engine(config: Config) -> Engine:
    """An engine on the pooling allocator where :func:`pooling_possible`, else on-demand."""
    if pooling_possible():
        _pooling(config)
    return Engine(config)


@dataclass(frozen=True)
class StoreShape:
    """How many instances, tables and table elements a store may create (one memory, always)."""

    instances: int
    tables: int
    table_elements: int  # per table; wasmtime keeps 8 bytes per element


RAW_SHAPE = StoreShape(instances=1, tables=2, table_elements=1 << 20)  # tables: at most 16 MiB
RUNNER_SHAPE = StoreShape(instances=32, tables=4, table_elements=1 << 16)  # the runner uses 16, 2, 5672


def limit_store(store: Store, memory_bytes: int, shape: StoreShape) -> None:
    """Bound the whole store, not each memory: wasmtime's ``memory_size`` limit applies to every
    linear memory separately, so the store may create only one."""
    store.set_limits(memory_size=memory_bytes, memories=1, instances=shape.instances,
                     tables=shape.tables, table_elements=shape.table_elements)  # fmt: skip


def wasi_config(writable: Sequence[str] = (), preopens: Sequence[tuple[str, str]] = ()) -> WasiConfig:
    """WASI with nothing granted (no args, environment, stdio or sockets) but the operator's
    ``--sandbox-writable-dir`` directories, each seen by the guest at its own path, and this run's
    ``preopens`` (host path, guest path), e.g. its instance's workspace directory."""
    wasi = WasiConfig()
    for directory in writable:
        wasi.preopen_dir(directory, directory)
    for host_path, guest_path in preopens:
        wasi.preopen_dir(host_path, guest_path)
    return wasi


class Budget:
    """One run's limits, enforced at every epoch tick on the thread that runs the guest.

    :meth:`arm` on that thread before the guest starts; :meth:`stop` from any thread."""

    def __init__(self, cpu_seconds: float, wall_seconds: float) -> None:
        self.cpu_seconds = cpu_seconds
        self.wall_seconds = wall_seconds
        self.stop_reason = ""  # set by stop(): the guest traps at its next tick
        self.reason = ""  # why this budget trapped the guest ("" if it did not)
        self._cpu0 = 0.0
        self._wall0 = time.monotonic()
        self._stopped = threading.Event()  # wakes a guest waiting in wait_until
        self._callback: Any = None  # keeps the C callback alive as long as the store

    def arm(self, store: Store) -> None:
        self._cpu0 = time.thread_time()
        self._wall0 = time.monotonic()
        self._callback = _Callback(self._on_deadline)
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), self._callback, None, _NO_FINALIZER)
        store.set_epoch_deadline(1)

    def stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        self._stopped.set()

    def wait_until(self, deadline: float) -> None:
        """Block the guest's thread until ``deadline`` (``time.monotonic()``), for a WASI sleep or
        poll; traps the guest as soon as it is stopped or its run's wall-clock limit passes."""
        while True:
            reason = self.stop_reason or self._wall_reason()
            if reason:
                self.reason = reason
                raise Trap(reason)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wall_left = self._wall0 + self.wall_seconds - time.monotonic()
            self._stopped.wait(max(0.0, min(left, wall_left, WAIT_SLICE)))

    def new_step(self) -> None:
        """A host call returned: the guest starts a fresh CPU budget (call on the guest's thread)."""
        self._cpu0 = time.thread_time()

    def cpu_used(self) -> float:
        """CPU seconds the guest's thread has used since the last host call (call on that thread)."""
        return time.thread_time() - self._cpu0

    def check(self) -> str:
        """Why the guest must stop now, or ""."""
        if self.stop_reason:
            return self.stop_reason
        if self.cpu_used() > self.cpu_seconds:
            return f"CPU limit exceeded ({self.cpu_seconds:g} s of CPU per step)"
        return self._wall_reason()

    def _wall_reason(self) -> str:
        if time.monotonic() - self._wall0 > self.wall_seconds:
            return f"wall-clock limit exceeded ({self.wall_seconds:g} s per run)"
        return ""

    def _on_deadline(self, _context: Any, _data: Any, delta: Any, kind: Any) -> int:
        try:
            reason = self.check()
        except BaseException:  # noqa: BLE001 - never let an exception cross into wasmtime
            reason = "the sandbox failed to check the run's limits"
        if reason:
            self.reason = reason
            error = ffi.wasmtime_error_new(reason.encode())
            return ctypes.cast(error, ctypes.c_void_p).value or 0
        delta[0] = 1
        kind[0] = _CONTINUE
        return 0


def trap_reason(exc: BaseException) -> str:
    """The useful part of a wasmtime error: the text after the last ``Caused by:``."""
    if isinstance(exc, ExitTrap):
        return (
            f"the guest exited before reporting a result (os._exit, sys.exit or proc_exit; status {exc.code})"
        )
    text = str(exc)
    if "Caused by:" in text:
        tail = text.rsplit("Caused by:", 1)[1]
        lines = [line.strip() for line in tail.strip().splitlines() if line.strip()]
        return "; ".join(lines)[:2000]
    return (text.strip().splitlines() or [type(exc).__name__])[0][:2000]


GUEST_THREAD = b"tf-wasm-guest"  # the OS name of threads running guests (``top -H``, /proc)


def _name_os_thread(name: bytes) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name, 0, 0, 0)  # PR_SET_NAME (Linux)
    except (OSError, AttributeError):
        pass


class ThreadPerRun(concurrent.futures.Executor):
    """Runs every guest on a thread of its own: a guest stuck in a host call can never hold a
    thread from a small shared pool that other tenants' runs then queue behind."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._count = itertools.count(1)
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError(f"{self._name}: the sandbox is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            _name_os_thread(GUEST_THREAD)
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(exc)

        threading.Thread(target=work, name=f"{self._name}-{next(self._count)}", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
