"""Tenant code: publishing artifacts, pinning refs through loaders, and the loaded-code cache."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, ResourceExhausted
from tenantflow.kernel.loader import CodeBundle, Loader
from tenantflow.kernel.model import Artifact
from tenantflow.kernel.sandbox import CodeError, Sandbox
from tenantflow.kernel.storage import Storage

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


class CodeCatalog:
    """Publishes, pins and loads tenant code; keeps loaded code while tenants are active."""

    def __init__(
        self,
        storage: Storage,
        loaders: dict[str, Loader],
        sandboxes: dict[str, Sandbox],
        config: KernelConfig,
    ) -> None:
        self._storage = storage
        self._loaders = loaders
        self._sandboxes = sandboxes
        self._config = config
        self._cache: OrderedDict[tuple[str, str], tuple[LoadedCode, float]] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedCode]] = {}
        self.loads = 0  # how many times code was actually loaded (cache misses)

    def sandbox(self, runtime: str) -> Sandbox:
        sandbox = self._sandboxes.get(runtime)
        if sandbox is None:
            raise InvalidArgument(f"unknown runtime {runtime!r}; installed: {sorted(self._sandboxes)}")
        return sandbox

    def inspect(self, runtime: str, files: Mapping[str, bytes]) -> dict[str, str]:
        try:
            return self.sandbox(runtime).inspect(files)
        except CodeError as exc:
            raise InvalidArgument(f"code rejected: {exc}") from None

    def publish(
        self, tenant: str, name: str, runtime: str, files: Mapping[str, bytes]
    ) -> tuple[str, list[str]]:
        if not NAME.match(name):
            raise InvalidArgument(f"bad code name {name!r}: 1-100 of letters, digits, '_', '-', '.'")
        size = sum(len(p) + len(d) for p, d in files.items())
        if size > self._config.max_code_bytes:
            raise ResourceExhausted(
                f"code is {size} bytes; the limit is {self._config.max_code_bytes}: publish only the workflow modules"
            )
        workflows = self.inspect(runtime, files)
        if not workflows:
            raise InvalidArgument("the code defines no workflow class (a top-level class with a run method)")
        digest = digest_files(runtime, files)
        self._storage.put_artifact(
            Artifact(tenant, name, digest, runtime, dict(files), workflows, time.time())
        )
        return artifact_ref(tenant, name, digest), sorted(workflows)

    def loader(self, ref: str) -> Loader:
        scheme = scheme_of(ref)
        loader = self._loaders.get(scheme)
        if loader is None:
            raise InvalidArgument(f"no code loader for {scheme!r} refs; installed: {sorted(self._loaders)}")
        return loader

    def pin(self, tenant: str, ref: str) -> str:
        if not ref:
            raise InvalidArgument(
                "code is required: a ref returned by Code.Publish, e.g. artifact://<tenant>/<name>"
            )
        return self.loader(ref).pin(tenant, ref)

    async def get(self, tenant: str, pinned: str) -> LoadedCode:
        """The loaded code behind a pinned ref; concurrent first uses load it once."""
        key = (tenant, pinned)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache[key] = (cached[0], now)
            self._cache.move_to_end(key)
            return cached[0]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[LoadedCode] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            code = await asyncio.to_thread(self._load, tenant, pinned)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        else:
            future.set_result(code)
            self._cache[key] = (code, time.monotonic())
            self._evict()
            return code
        finally:
            del self._loading[key]

    def _load(self, tenant: str, pinned: str) -> LoadedCode:
        bundle = self.loader(pinned).load(tenant, pinned)
        self.loads += 1
        return LoadedCode(bundle, self.inspect(bundle.runtime, bundle.files))

    def _evict(self) -> None:
        horizon = time.monotonic() - self._config.code_cache_idle_seconds
        while self._cache and (
            len(self._cache) > self._config.code_cache_entries
            or next(iter(self._cache.values()))[1] < horizon
        ):
            self._cache.popitem(last=False)

    def sweep(self) -> int:
        """Drop code idle for longer than the configured age; return how many entries remain."""
        self._evict()
        return len(self._cache)
