"""Tenant code: publishing artifacts, pinning refs through loaders, and the loaded-code cache.

Every instance stores a *pinned* ref (artifact digest, git commit) at ``Create`` and runs that code for
life, ``Restart`` included; new code reaches new instances only. The cache keeps loaded code per
``(tenant, pinned ref)`` in LRU order, bounded by ``code_cache_entries``, by ``code_cache_bytes`` of
source and by ``code_cache_idle_seconds`` of disuse; ``Kernel`` runs :meth:`CodeCatalog.sweep_forever` so idle
tenants' code is dropped even when no new code arrives.

Checking code (``Sandbox.inspect``) is tenant input handled by the sandboxes in limited child
processes, never parsed here; the catalog runs those checks concurrently for different tenants,
one at a time per tenant and at most :data:`MAX_INSPECTIONS` at once, on threads of its own (a
slow check never holds a thread the rest of the kernel needs). A check's answer is a pure function
of the bytes it checked, so the catalog remembers the answers of passed checks (bounded by
:data:`CHECKED_ENTRIES`): a cache miss for code checked before in this process only loads bytes, and
code it has never checked (e.g. an artifact stored by an older kernel) is checked before it runs.
Large code (over
:data:`SMALL_CODE_BYTES`) may hold all slots but one, so small code always gets checked soon, and
its bytes checked or queued kernel-wide are bounded (``max_publish_bytes_in_flight``): past that,
and past half the caller's deadline in the queue, Publish fails fast with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import gc
import hashlib
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tenantflow.kernel import metrics
from tenantflow.kernel.admission import BytesInFlight
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, ResourceExhausted
from tenantflow.kernel.loader import CodeBundle, Loader
from tenantflow.kernel.model import Artifact
from tenantflow.kernel.sandbox import HAZARDS, CodeError, CodeWarning, Inspection, Sandbox
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.kernel.code")
MAX_INSPECTIONS = 4  # code checks at once (each a child process with its own memory cap)
SMALL_CODE_BYTES = 1024 * 1024  # code up to this size is cheap to check: never held back by large code
QUEUE_SECONDS = 30.0  # the longest a check waits for a slot when its caller set no deadline
MIB = 1024 * 1024
CHECKED_ENTRIES = 100_000  # remembered passed checks (~200 bytes each)
CHECKED_MAX_CHARS = 1024  # larger answers (many workflow classes) are not remembered: re-checked
NAME = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,99}$")


def artifact_ref(tenant: str, name: str, digest: str) -> str:
    """The pinned ref ``Code.Publish`` returns."""
    return f"artifact://{tenant}/{name}@sha256:{digest}"


def digest_files(runtime: str, files: Mapping[str, bytes]) -> str:
    """Content address of a set of files: the same files give the same digest."""
    h = hashlib.sha256(f"tenantflow-artifact-v1\0{runtime}\0".encode())
    for path in sorted(files):
        data = files[path]
        h.update(f"{path}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def scheme_of(ref: str) -> str:
    scheme, sep, _ = ref.partition("://")
    if not sep or not scheme:
        raise InvalidArgument(
            f"bad code ref {ref!r}: expected <scheme>://..., e.g. artifact://<tenant>/<name>"
        )
    return scheme


@dataclass(frozen=True)
class LoadedCode:
    """A pinned bundle and its workflow classes (``{class: module}``)."""

    bundle: CodeBundle
    workflows: dict[str, str]

    @functools.cached_property
    def size(self) -> int:
        """Bytes of source held (what the cache's byte bound counts)."""
        return sum(len(path) + len(data) for path, data in self.bundle.files.items())


@dataclass
class _Entry:
    code: LoadedCode
    used: float  # time.monotonic() of the last use


class CodeCatalog:
    """Publishes, pins and loads tenant code; keeps loaded code while tenants are active."""

    def __init__(
        self,
        storage: Storage,
        loaders: dict[str, Loader],
        sandboxes: dict[str, Sandbox],
        config: KernelConfig,
        unavailable: Callable[[str], str] = lambda wanted: "",
    ) -> None:
        self._storage = storage
        self._loaders = loaders
        self._sandboxes = sandboxes
        self._config = config
        self._unavailable = unavailable  # why a runtime or scheme has no plugin (Plugins.unavailable)
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.bytes = 0  # source bytes held by the cache
        self._loading: dict[tuple[str, str], asyncio.Task[LoadedCode]] = {}
        self.loads = 0  # how many times code was actually loaded (cache misses)
        self._checkers = concurrent.futures.ThreadPoolExecutor(MAX_INSPECTIONS, "tenantflow-inspect")
        self._gate: _Gate | None = None
        self.publishing = BytesInFlight(config.max_publish_bytes_in_flight)
        self._checked: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self.checks = 0  # code checks started (each a checker child): what the checked map saves

    def sandbox(self, runtime: str) -> Sandbox:
        sandbox = self._sandboxes.get(runtime)
        if sandbox is None:
            raise InvalidArgument(
                f"unknown runtime {runtime!r}; installed: {sorted(self._sandboxes)}{self._unavailable(runtime)}"
            )
        return sandbox

    def inspect_now(self, runtime: str, files: Mapping[str, bytes]) -> Inspection:
        """Check code with its sandbox on this thread (the sandbox does it in a limited child)."""
        self.checks += 1
        try:
            found = self.sandbox(runtime).inspect(files)
        except CodeError as exc:
            raise InvalidArgument(f"code rejected: {exc}") from None
        return found if isinstance(found, Inspection) else Inspection(dict(found))

    async def inspect(
        self,
        tenant: str,
        runtime: str,
        files: Mapping[str, bytes],
        queue_seconds: float | None = None,
        publishing: bool = False,
    ) -> Inspection:
        """:meth:`inspect_now` on the catalog's own threads, once ``tenant`` has no other check
        running and one of the :data:`MAX_INSPECTIONS` slots is free (for large code, one of all
        but the last). With ``queue_seconds``, waiting longer than that for a slot fails fast;
        ``publishing`` large code counts against the Publish bytes in flight."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate.loop is not loop:
            self._gate = _Gate(MAX_INSPECTIONS)
        gate = self._gate
        size = sum(len(p) + len(d) for p, d in files.items())
        large = size > SMALL_CODE_BYTES
        held = size if large and publishing else 0
        # Large code's bytes count from the queue until its check ends (the check holds a copy).
        if held and (busy := self.publish_busy(held)):
            raise ResourceExhausted(busy)
        self.publishing.take(held)
        try:
            async with asyncio.timeout(queue_seconds):
                await gate.acquire(tenant, large)
        except TimeoutError:
            self.publishing.give(held)
            raise ResourceExhausted(
                f"the code checks are busy: no check of yours could start within {queue_seconds:.1f} s "
                "(half of this call's deadline, or 30 s); retry in a few seconds"
            ) from None
        except BaseException:
            self.publishing.give(held)
            raise
        try:
            check = loop.run_in_executor(self._checkers, self.inspect_now, runtime, dict(files))
        except BaseException:
            gate.release(tenant, large)
            self.publishing.give(held)
            raise
        # A caller that gives up (cancelled Publish) does not end the check: its slot stays taken
        # until the check does, so a tenant cannot run more than one at a time by cancelling.
        check.add_done_callback(lambda done: _finished(done, gate, tenant, large))
        check.add_done_callback(lambda _: self.publishing.give(held))
        return await asyncio.shield(check)

    def publish_busy(self, size: int) -> str:
        """Why a Publish of ``size`` bytes is turned away now ("" if it may go ahead)."""
        used, limit = self.publishing.used, self.publishing.limit
        if size <= SMALL_CODE_BYTES or not used or used + size <= limit:
            return ""
        return (
            f"too many large publishes in progress ({used / MIB:.0f} MiB being checked; the kernel's limit "
            f"is {limit / MIB:g} MiB); retry in a few seconds"
        )

    def _check_publish(self, name: str, files: Mapping[str, bytes]) -> None:
        if not NAME.match(name):
            raise InvalidArgument(f"bad code name {name!r}: 1-100 of letters, digits, '_', '-', '.'")
        size = sum(len(p) + len(d) for p, d in files.items())
        if size > self._config.max_code_bytes:
            raise ResourceExhausted(
                f"code is {size} bytes; the limit is {self._config.max_code_bytes}: publish only the workflow modules"
            )

    def _store(
        self, tenant: str, name: str, runtime: str, files: Mapping[str, bytes], workflows: dict[str, str]
    ) -> tuple[str, list[str]]:
        if not workflows:
            raise InvalidArgument("the code defines no workflow class (a top-level class with a run method)")
        digest = digest_files(runtime, files)
        self._storage.put_artifact(
            Artifact(tenant, name, digest, runtime, dict(files), workflows, time.time())
        )
        return artifact_ref(tenant, name, digest), sorted(workflows)

    async def publish_async(
        self,
        tenant: str,
        name: str,
        runtime: str,
        files: Mapping[str, bytes],
        deadline: float | None = None,
        strict: bool = False,
    ) -> tuple[str, list[str], tuple[CodeWarning, ...]]:
        """What ``Code.Publish`` does: check the code (queued per tenant), store it, return its ref,
        workflow classes and warnings. ``deadline``: the caller's seconds left; the check waits for a
        slot at most half of them. ``strict``: refuse code with determinism hazards, storing nothing."""
        self._check_publish(name, files)
        queue = QUEUE_SECONDS if deadline is None else max(deadline / 2, 0.0)
        found = await self.inspect(tenant, runtime, files, queue, publishing=True)
        if strict and (hazards := [w for w in found.warnings if w.kind in HAZARDS]):
            listed = "; ".join(f"{w.file}, line {w.line}: {w.message}" for w in hazards[:5])
            more = f" (and {len(hazards) - 5} more)" if len(hazards) > 5 else ""
            raise InvalidArgument(
                f"code refused (strict): {len(hazards)} determinism hazard(s): {listed}{more}"
            )
        ref, names = await asyncio.to_thread(self._store, tenant, name, runtime, files, found.workflows)
        self._remember(
            _check_key(ref.rpartition("@sha256:")[2], None), found.workflows
        )  # ref ends in the digest
        return ref, names, found.warnings

    def publish(
        self, tenant: str, name: str, runtime: str, files: Mapping[str, bytes]
    ) -> tuple[str, list[str]]:
        """:meth:`publish_async` on the calling thread, without the per-tenant queue (tools, tests)."""
        self._check_publish(name, files)
        workflows = self.inspect_now(runtime, files).workflows
        ref, names = self._store(tenant, name, runtime, files, workflows)
        self._remember(_check_key(ref.rpartition("@sha256:")[2], None), workflows)  # ref ends in the digest
        return ref, names

    def loader(self, ref: str) -> Loader:
        scheme = scheme_of(ref)
        loader = self._loaders.get(scheme)
        if loader is None:
            raise InvalidArgument(
                f"no code loader for {scheme!r} refs; installed: {sorted(self._loaders)}{self._unavailable(scheme)}"
            )
        return loader

    def pin(self, tenant: str, ref: str) -> str:
        if not ref:
            raise InvalidArgument(
                "code is required: a ref returned by Code.Publish, e.g. artifact://<tenant>/<name>"
            )
        return self.loader(ref).pin(tenant, ref)

    async def pin_async(self, tenant: str, ref: str) -> str:
        """:meth:`pin` in a worker thread, or at once for a version loaded now: only pinned refs are
        ever loaded (a loader refuses the rest), and a pinned ref is its own pin."""
        if (tenant, ref) in self._cache:
            return ref
        return await asyncio.to_thread(self.pin, tenant, ref)

    async def get(self, tenant: str, pinned: str) -> LoadedCode:
        """The loaded code behind a pinned ref. Concurrent first uses share one load; a caller that is
        cancelled does not cancel the load for the others."""
        key = (tenant, pinned)
        cached = self._cache.get(key)
        metrics.code_cache(hit=cached is not None)
        if cached is not None:
            cached.used = time.monotonic()
            self._cache.move_to_end(key)
            return cached.code
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._fill(key))
            self._loading[key] = task
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _fill(self, key: tuple[str, str]) -> LoadedCode:
        try:
            code = await self._load(*key)
            self.loads += 1
            self._cache[key] = _Entry(code, time.monotonic())
            self.bytes += code.size
            self._evict()
            return code
        finally:
            del self._loading[key]

    async def _load(self, tenant: str, pinned: str) -> LoadedCode:
        bundle, key = await asyncio.to_thread(self._read, tenant, pinned)
        if (known := self._recall(key)) is not None:
            return LoadedCode(bundle, known)
        workflows = (await self.inspect(tenant, bundle.runtime, bundle.files)).workflows  # checks every file
        if bundle.entry is not None:  # only the entry module's classes are workflows
            entry = {p: d for p, d in bundle.files.items() if _module(p) == bundle.entry}
            if not entry:
                raise InvalidArgument(f"{pinned}: the bundle has no module {bundle.entry!r}")
            workflows = (await self.inspect(tenant, bundle.runtime, entry)).workflows
        self._remember(key, workflows)
        return LoadedCode(bundle, workflows)

    def _read(self, tenant: str, pinned: str) -> tuple[CodeBundle, bytes]:
        """The pinned bundle and the key of its check (hashed here, off the event loop)."""
        bundle = self.loader(pinned).load(tenant, pinned)
        return bundle, _check_key(digest_files(bundle.runtime, bundle.files), bundle.entry)

    def _recall(self, key: bytes) -> dict[str, str] | None:
        """The workflows a passed check found in exactly these bytes, if remembered."""
        known = self._checked.get(key)
        if known is None:
            return None
        self._checked.move_to_end(key)
        return dict(zip(known[::2], known[1::2], strict=True))

    def _remember(self, key: bytes, workflows: Mapping[str, str]) -> None:
        flat = tuple(sys.intern(s) for pair in workflows.items() for s in pair)  # "Flow", "wf": shared
        if not flat or sum(map(len, flat)) > CHECKED_MAX_CHARS:
            return
        self._checked[key] = flat
        self._checked.move_to_end(key)
        while len(self._checked) > CHECKED_ENTRIES:
            self._checked.popitem(last=False)

    def _evict(self) -> int:
        """Drop least recently used entries past the entry or byte bound, or idle past the age bound.
        The newest entry stays even if it alone is over the byte bound: it is in use."""
        horizon = time.monotonic() - self._config.code_cache_idle_seconds
        dropped = 0
        while self._cache and (
            len(self._cache) > self._config.code_cache_entries
            or (self.bytes > self._config.code_cache_bytes and len(self._cache) > 1)
            or next(iter(self._cache.values())).used < horizon
        ):
            _, entry = self._cache.popitem(last=False)
            self.bytes -= entry.code.size
            dropped += 1
        metrics.code_evicted(dropped)
        return dropped

    def __len__(self) -> int:
        return len(self._cache)

    def sweep(self) -> int:
        """Drop code idle for longer than the configured age and hand freed memory back to the OS;
        return how many entries remain."""
        dropped = self._evict()
        if dropped:
            gc.collect()  # objects in old reference cycles pin pymalloc arenas: free them, then trim
            _trim()
            log.info("code cache: evicted %d idle entries, %d remain", dropped, len(self._cache))
        return len(self._cache)

    async def sweep_forever(self) -> None:
        """Sweep every quarter of the idle age (at most every 30 s) until cancelled: idle tenants cost
        no memory even when nothing else touches the cache."""
        interval = min(30.0, max(0.05, self._config.code_cache_idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()


class _Gate:
    """At most ``slots`` holders at once, and one per tenant: a tenant's burst queues behind itself,
    so it holds one slot at most and others' checks go ahead."""

    def __init__(self, slots: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(slots)
        self._large = asyncio.Semaphore(max(slots - 1, 1))  # the last slot is kept for small code
        self._tenants: dict[str, tuple[asyncio.Lock, int]] = {}  # lock, holders and waiters

    async def acquire(self, tenant: str, large: bool = False) -> None:
        lock, users = self._tenants.get(tenant, (asyncio.Lock(), 0))
        self._tenants[tenant] = (lock, users + 1)
        try:
            await lock.acquire()
            try:
                if large:
                    await self._large.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    if large:
                        self._large.release()
                    raise
            except BaseException:
                lock.release()
                raise
        except BaseException:
            self._forget(tenant)
            raise

    def release(self, tenant: str, large: bool = False) -> None:
        self._slots.release()
        if large:
            self._large.release()
        self._tenants[tenant][0].release()
        self._forget(tenant)

    def _forget(self, tenant: str) -> None:
        lock, users = self._tenants[tenant]
        if users == 1:
            del self._tenants[tenant]
        else:
            self._tenants[tenant] = (lock, users - 1)


def _finished(check: asyncio.Future[Inspection], gate: _Gate, tenant: str, large: bool) -> None:
    """Free the check's slot; mark its outcome as seen even if its caller is gone."""
    gate.release(tenant, large)
    if not check.cancelled():
        check.exception()


def _check_key(digest: str, entry: str | None) -> bytes:
    """What a check's answer depends on: the files (``digest_files``) and the entry module."""
    return hashlib.sha256(f"{digest}\0{entry or ''}".encode()).digest()


def _module(path: str) -> str:
    """``pkg/mod.py`` -> ``pkg.mod`` (as the guest runtime names modules)."""
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _retrieve(task: asyncio.Task[LoadedCode]) -> None:
    """Mark a failed load's exception as seen, even if every waiter was cancelled."""
    if not task.cancelled():
        task.exception()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim() -> None:
    """glibc keeps freed heap pages; ``malloc_trim`` returns them to the OS (a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
