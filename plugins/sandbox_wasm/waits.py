"""Guest waits (WASI sleep, poll, clock subscriptions) that the run's limits can interrupt.

wasmtime's own WASI blocks the calling thread inside Rust for as long as the guest asked (a
``time.sleep`` of days), where neither epoch interruption nor the kernel can reach it. So both
sandboxes shadow the WASI functions that wait with ours, which wait on the run's
:meth:`Budget.wait_until`: a step time-out, a pause or termination (:meth:`Budget.stop`) or the
run's wall-clock limit traps the guest within moments, and its thread returns.

- Preview 1 (raw modules): ``poll_oneoff``, and ``clock_time_get``/``clock_res_get`` so that
  absolute deadlines use the same clock as the waits.
- Preview 2 (the python-wasm runner): the ``wasi:io/poll`` interface and its ``pollable``
  resource, ``wasi:clocks/monotonic-clock``, and every ``subscribe`` that makes a pollable
  (streams and sockets). Clock pollables wait for their deadline; stream and socket pollables are
  always ready: stdio is empty or discarded, files never block, and guests have no network.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from wasmtime import Caller, Engine, FuncType, Linker, Memory, Trap, ValType, WasmtimeError
from wasmtime.component import Linker as ComponentLinker
from wasmtime.component import ResourceAny, ResourceHost, ResourceType

from tenantflow.plugins.sandbox_wasm.bridge import current_bridge
from tenantflow.plugins.sandbox_wasm.engine import Budget

MAX_POLLABLES = 10_000  # live pollables per run: each costs the kernel a little memory
MAX_SUBSCRIPTIONS = 4096  # per poll_oneoff call
_NEVER = float("inf")


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
_POLLABLE_TYPE = 0x7466_7031  # our host resource type for wasi:io/poll's pollable ("tfp1")


class _Pollables:
    """One run's live pollables: rep -> monotonic deadline (0: always ready, inf: never)."""

    def __init__(self) -> None:
        self.deadlines: dict[int, float] = {}
        self._next = 1

    def add(self, deadline: float) -> ResourceHost:
        if len(self.deadlines) >= MAX_POLLABLES:
            raise Trap(f"too many live WASI pollables (at most {MAX_POLLABLES} per run)")
        rep, self._next = self._next, self._next + 1
        self.deadlines[rep] = deadline
        return ResourceHost.own(rep, _POLLABLE_TYPE)

    def deadline(self, store: Any, pollable: ResourceAny) -> float:
        host = pollable.to_host(store)
        deadline = self.deadlines.get(host.rep) if host.type == _POLLABLE_TYPE else None
        if deadline is None:
            raise Trap("unknown WASI pollable")
        return deadline


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


def begin_run() -> None:
    """A fresh pollable table for the run about to start on this thread."""
    _runs.pollables = _Pollables()


def end_run() -> None:
    _runs.pollables = None


def _table() -> _Pollables:
    table: _Pollables | None = getattr(_runs, "pollables", None)
    if table is None:
        raise Trap("no run is active on this thread")
    return table


@_component_func
def _subscribe_duration(_store: Any, nanos: int) -> ResourceHost:
    return _table().add(time.monotonic() + nanos / 1e9)


@_component_func
def _subscribe_instant(_store: Any, when: int) -> ResourceHost:
    return _table().add(when / 1e9)  # our `now` is time.monotonic_ns(), so the same clock


@_component_func
def _ready_pollable(_store: Any, _resource: ResourceAny) -> ResourceHost:
    return _table().add(0.0)


@_component_func
def _ready(store: Any, pollable: ResourceAny) -> bool:
    return _table().deadline(store, pollable) <= time.monotonic()


@_component_func
def _block(store: Any, pollable: ResourceAny) -> None:
    _budget().wait_until(_table().deadline(store, pollable))


@_component_func
def _poll(store: Any, pollables: list[ResourceAny]) -> list[int]:
    if not pollables:
        raise Trap("wasi:io/poll.poll: the list of pollables is empty")
    table = _table()
    deadlines = [table.deadline(store, p) for p in pollables]
    if min(deadlines) > time.monotonic():
        _budget().wait_until(min(deadlines))
    now = time.monotonic()
    return [i for i, deadline in enumerate(deadlines) if deadline <= now]


def _drop(_store: Any, rep: int) -> None:
    table: _Pollables | None = getattr(_runs, "pollables", None)
    if table is not None:
        table.deadlines.pop(rep, None)


_P2_SUBSCRIBERS = {
    "wasi:io/streams": ("[method]input-stream.subscribe", "[method]output-stream.subscribe"),
    "wasi:sockets/tcp": ("[method]tcp-socket.subscribe",),
    "wasi:sockets/udp": (
        "[method]udp-socket.subscribe",
        "[method]incoming-datagram-stream.subscribe",
        "[method]outgoing-datagram-stream.subscribe",
    ),
    "wasi:sockets/ip-name-lookup": ("[method]resolve-address-stream.subscribe",),
}


def _defined_version(engine: Engine, interface: str, probe: str) -> str:
    """The exact ``@0.2.x`` version of ``interface`` that wasmtime's ``add_wasip2`` defines: a
    reopened instance must carry it, or it would be a second instance beside wasmtime's."""
    for patch in range(64):
        linker = ComponentLinker(engine)
        linker.add_wasip2()
        try:
            with linker.root() as root, root.add_instance(f"{interface}@0.2.{patch}") as instance:
                instance.add_func(probe, _drop)
        except Exception:  # noqa: BLE001 - "defined twice": this is wasmtime's version
            return f"{interface}@0.2.{patch}"
    raise RuntimeError(f"cannot find wasmtime's {interface} (is this wasmtime's WASI 0.2?)")


def shadow_preview2(engine: Engine, linker: ComponentLinker) -> None:
    """Replace wasi:io/poll, the monotonic clock and every ``subscribe`` (after ``add_wasip2()``)."""
    poll = _defined_version(engine, "wasi:io/poll", "poll")
    clock = _defined_version(engine, "wasi:clocks/monotonic-clock", "now")
    linker.allow_shadowing = True
    with linker.root() as root:
        with root.add_instance(poll) as instance:
            instance.add_resource("pollable", ResourceType.host(_POLLABLE_TYPE), _drop)
            instance.add_func("[method]pollable.ready", _ready)
            instance.add_func("[method]pollable.block", _block)
            instance.add_func("poll", _poll)
        with root.add_instance(clock) as instance:
            instance.add_func("now", lambda _store: time.monotonic_ns())
            instance.add_func("resolution", lambda _store: 1)
            instance.add_func("subscribe-duration", _subscribe_duration)
            instance.add_func("subscribe-instant", _subscribe_instant)
        version = poll.rsplit("@", 1)[1]
        for interface, names in _P2_SUBSCRIBERS.items():
            with root.add_instance(f"{interface}@{version}") as instance:
                for name in names:
                    instance.add_func(name, _ready_pollable)
    linker.allow_shadowing = False
