"""The one wasmtime Engine both wasm sandboxes share, and each run's CPU/wall/stop budget on it.

Epoch interruption, not fuel: a ticker thread advances the engine's epoch every :data:`TICK`
seconds while any run is active. Every store's deadline is one tick away, and its deadline
callback decides each time: carry on, or trap with a reason (CPU limit, wall-clock limit, stopped
by the kernel). So a runaway guest is stopped within a tick of its limit, and the kernel can
stop one guest from another thread without touching the others.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

from wasmtime import Config, Engine, ExitTrap, Store, WasiConfig
from wasmtime import _ffi as ffi  # the deadline callback has no public wrapper in wasmtime-py 50

TICK = 0.01
WASMTIME_VERSION = version("wasmtime")
ENGINE_TAG = f"wasmtime-{WASMTIME_VERSION}-epoch"  # compiled artifacts depend on both

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
_shared: tuple[Engine, _Ticker] | None = None


def shared_engine() -> tuple[Engine, _Ticker]:
    """The process-wide engine (epoch interruption on) and its ticker."""
    global _shared
    with _lock:
        if _shared is None:
            config = Config()
            config.epoch_interruption = True
            config.cranelift_opt_level = "speed"
            engine = Engine(config)
            _shared = (engine, _Ticker(engine))
        return _shared


def wasi_config(writable: Sequence[str] = ()) -> WasiConfig:
    """WASI with nothing granted (no args, environment, stdio or sockets) but the operator's
    ``--sandbox-writable-dir`` directories, each seen by the guest at its own path."""
    wasi = WasiConfig()
    for directory in writable:
        wasi.preopen_dir(directory, directory)
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
        self._wall0 = 0.0
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
