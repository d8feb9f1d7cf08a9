"""Guest waits (WASI sleep, poll, clock subscriptions) that the run's limits can interrupt.

wasmtime's own WASI blocks the calling thread inside Rust for as long as the guest asked (a
``time.sleep`` of days), where neither epoch interruption nor the kernel can reach it. So both
sandboxes shadow the WASI functions that wait with ours, which wait on the run's
:meth:`Budget.wait_until`: a step time-out, a pause or termination (:meth:`Budget.stop`) or the
run's wall-clock limit traps the guest within moments, and its thread returns.

- Preview 1 (raw modules): ``poll_oneoff``, and ``clock_time_get``/``clock_res_get`` so that
  absolute deadlines use the same clock as the waits.
- Preview 2 (the python-wasm runner): ``wasi:io/poll``'s ``poll`` and ``[method]pollable.block``,
  which every blocking wait (clock subscriptions, streams, sockets) goes through; they wait by
  asking wasmtime's own ``[method]pollable.ready``.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from wasmtime import Caller, Engine, FuncType, Linker, Memory, Store, Trap, ValType, WasmtimeError, wat2wasm
from wasmtime.component import Component, ResourceAny
from wasmtime.component import Linker as ComponentLinker

from tenantflow.plugins.sandbox_wasm.bridge import current_bridge
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import Budget

MAX_SUBSCRIPTIONS = 4096  # per poll_oneoff call


def _budget() -> Budget:
    return current_bridge().budget


# -- preview 1 -------------------------------------------------------------------------------------
_P1 = "wasi_snapshot_preview1"
_OK, _BADF, _FAULT, _INVAL = 0, 8, 21, 28  # WASI errno values
_SUBSCRIPTION = 48  # bytes: userdata u64, tag u8 @8, clock {id u32 @16, timeout u64 @24, flags u16 @40}
_EVENT = 32  # bytes: userdata u64, error u16 @8, type u8 @10, fd_readwrite {nbytes u64 @16, flags u16 @24}
_ABSTIME = 1


def _p1_memory(caller: Caller) -> Memory:
    memory = caller.get("memory")
    if not isinstance(memory, Memory):
        raise Trap("WASI needs the module to export its linear memory as 'memory'")
    return memory


def _p1_now(clock: int) -> int | None:
    """Nanoseconds on WASI clock ``clock`` (0 realtime, 1 monotonic), None for others."""
    if clock == 0:
        return time.time_ns()
    if clock == 1:
        return time.monotonic_ns()
    return None


def _p1_clock_time_get(caller: Caller, clock: int, _precision: int, out: int) -> int:
    now = _p1_now(clock)
    if now is None:
        return _BADF if clock in (2, 3) else _INVAL  # CPU-time clocks: unsupported, as in wasmtime
    memory = _p1_memory(caller)
    if out < 0 or out + 8 > memory.data_len(caller):
        return _FAULT
    memory.write(caller, struct.pack("<Q", now), out)
    return _OK


def _p1_clock_res_get(caller: Caller, clock: int, out: int) -> int:
    if _p1_now(clock) is None:
        return _BADF if clock in (2, 3) else _INVAL
    memory = _p1_memory(caller)
    if out < 0 or out + 8 > memory.data_len(caller):
        return _FAULT
    memory.write(caller, struct.pack("<Q", 1), out)
    return _OK


def _p1_poll_oneoff(caller: Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int) -> int:
    in_ptr, out_ptr, nevents_ptr = in_ptr & 0xFFFFFFFF, out_ptr & 0xFFFFFFFF, nevents_ptr & 0xFFFFFFFF
    if not 0 < count <= MAX_SUBSCRIPTIONS:
        return _INVAL
    memory = _p1_memory(caller)
    size = memory.data_len(caller)
    if in_ptr + count * _SUBSCRIPTION > size or out_ptr + count * _EVENT > size or nevents_ptr + 4 > size:
        return _FAULT
    raw = bytes(memory.read(caller, in_ptr, in_ptr + count * _SUBSCRIPTION))
    now = time.monotonic()
    clocks: list[tuple[int, float]] = []  # (userdata, monotonic deadline)
    events: list[bytes] = []
    for i in range(count):
        sub = raw[i * _SUBSCRIPTION : (i + 1) * _SUBSCRIPTION]
        userdata, tag = struct.unpack_from("<QB", sub)
        if tag == 0:
            clock, timeout, _precision, flags = struct.unpack_from("<I4xQQH", sub, 16)
            base = _p1_now(clock)
            if base is None:
                events.append(struct.pack("<QHBx4xQH6x", userdata, _INVAL, 0, 0, 0))
                continue
            wait = (timeout - base if flags & _ABSTIME else timeout) / 1e9
            clocks.append((userdata, now + wait))
        elif tag in (1, 2):  # fd_read / fd_write: never blocks here (see the module docstring)
            events.append(struct.pack("<QHBx4xQH6x", userdata, _OK, tag, 0, 0))
        else:
            return _INVAL
    if not events and clocks:
        _budget().wait_until(min(deadline for _, deadline in clocks))
    now = time.monotonic()
    events += [struct.pack("<QHBx4xQH6x", u, _OK, 0, 0, 0) for u, deadline in clocks if deadline <= now]
    memory.write(caller, b"".join(events), out_ptr)
    memory.write(caller, struct.pack("<I", len(events)), nevents_ptr)
    return _OK


def shadow_preview1(linker: Linker) -> None:
    """Replace the preview 1 functions that wait (call after ``linker.define_wasi()``)."""
    i32, i64 = ValType.i32(), ValType.i64()
    linker.allow_shadowing = True
    for name, params, func in (
        ("poll_oneoff", [i32, i32, i32, i32], _p1_poll_oneoff),
        ("clock_time_get", [i32, i64, i32], _p1_clock_time_get),
        ("clock_res_get", [i32, i32], _p1_clock_res_get),
    ):
        linker.define_func(_P1, name, FuncType(params, [i32]), func, access_caller=True)
    linker.allow_shadowing = False


# -- preview 2 -------------------------------------------------------------------------------------
# wasmtime's own pollables stay (file streams only make progress when wasmtime's `ready` polls
# them); only the two calls that block are ours. They ask wasmtime's non-blocking
# `[method]pollable.ready`, through this tiny component instantiated in each run's store (the
# only way a host function can call another host function's implementation), and wait between
# asks on the run's budget.
_READY_HELPER = """
(component
  (import "%(poll)s" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.ready" (func (param "self" (borrow $p)) (result bool)))))
  (alias export $poll "pollable" (type $pollable))
  (alias export $poll "[method]pollable.ready" (func $ready))
  (core func $ready_lowered (canon lower (func $ready)))
  (core func $drop (canon resource.drop $pollable))
  (core module $m
    (import "host" "ready" (func $r (param i32) (result i32)))
    (import "host" "drop" (func $d (param i32)))
    ;; a callee must drop the borrows it was lent before it returns
    (func (export "ready") (param $p i32) (result i32)
      (call $r (local.get $p)) (call $d (local.get $p))))
  (core instance $host (export "ready" (func $ready_lowered)) (export "drop" (func $drop)))
  (core instance $i (instantiate $m (with "host" (instance $host))))
  (func (export "ready") (param "p" (borrow $pollable)) (result bool)
    (canon lift (core func $i "ready"))))
"""
_FIRST_SLICE, _LAST_SLICE = 0.0005, 0.02  # seconds between asks: short for I/O, then backing off
_runs = threading.local()


def _component_func(func: Callable[..., Any]) -> Callable[..., Any]:
    """A component host function whose traps are WasmtimeErrors: wasmtime-py keeps any other
    exception in one process-wide slot, where another thread's run could pick it up."""

    @wraps(func)
    def call(*args: Any) -> Any:
        try:
            return func(*args)
        except Trap as exc:
            raise WasmtimeError(exc.message) from None

    return call


class ReadyHelper:
    """The compiled helper component; :meth:`begin_run` instantiates it in a run's store."""

    def __init__(self, engine: Engine, poll: str) -> None:
        self.component = Component(engine, wat2wasm(_READY_HELPER % {"poll": poll}))

    def begin_run(self, linker: ComponentLinker, store: Store) -> None:
        """Make this thread's guest waits ask readiness through ``store``'s helper instance."""
        ready = linker.instantiate(store, self.component).get_func(store, "ready")
        assert ready is not None
        _runs.ready = ready


def end_run() -> None:
    _runs.ready = None


def _wait_for(store: Any, pollables: list[ResourceAny]) -> list[int]:
    """Indices of the ready pollables, waiting (in slices, on the budget) until there is one."""
    ready_func = getattr(_runs, "ready", None)
    if ready_func is None:
        raise Trap("no run is active on this thread")
    budget = _budget()
    pause = _FIRST_SLICE
    while True:
        ready = [i for i, p in enumerate(pollables) if ready_func(store, p)]
        if ready:
            return ready
        budget.wait_until(time.monotonic() + pause)
        pause = min(pause * 2, _LAST_SLICE)


@_component_func
def _block(store: Any, pollable: ResourceAny) -> None:
    try:
        _wait_for(store, [pollable])
    finally:
        pollable.drop(store)  # release the borrow before the call returns


@_component_func
def _poll(store: Any, pollables: list[ResourceAny]) -> list[int]:
    if not pollables:
        raise Trap("wasi:io/poll.poll: the list of pollables is empty")
    try:
        return _wait_for(store, pollables)
    finally:
        for pollable in pollables:
            pollable.drop(store)


def _defined_version(engine: Engine, interface: str, probe: str) -> str:
    """The exact ``@0.2.x`` version of ``interface`` that wasmtime's ``add_wasip2`` defines: a
    reopened instance must carry it, or it would be a second instance beside wasmtime's."""
    for patch in range(64):
        linker = ComponentLinker(engine)
        linker.add_wasip2()
        try:
            with linker.root() as root, root.add_instance(f"{interface}@0.2.{patch}") as instance:
                instance.add_func(probe, _block)
        except Exception:  # noqa: BLE001 - "defined twice": this is wasmtime's version
            return f"{interface}@0.2.{patch}"
    raise RuntimeError(f"cannot find wasmtime's {interface} (is this wasmtime's WASI 0.2?)")


def shadow_preview2(engine: Engine, linker: ComponentLinker) -> ReadyHelper:
    """Replace ``wasi:io/poll``'s ``poll`` and ``[method]pollable.block`` (after ``add_wasip2()``);
    returns the helper each run's store needs (:meth:`ReadyHelper.begin_run`)."""
    poll = _defined_version(engine, "wasi:io/poll", "poll")
    helper = ReadyHelper(engine, poll)
    linker.allow_shadowing = True
    with linker.root() as root, root.add_instance(poll) as instance:
        instance.add_func("[method]pollable.block", _block)
        instance.add_func("poll", _poll)
    linker.allow_shadowing = False
    return helper
