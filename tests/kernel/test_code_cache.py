"""The loaded-code cache on real storage, loaders and sandbox: loads once, LRU, idle eviction."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import NotFound
from tenantflow.kernel.plugins import Plugins
from tenantflow.plugins.sandbox_subprocess.sandbox import SubprocessSandbox
from tests.plugins.loader_git.gitrepo import GitRepo, workflow

TENANT = "acme"


def catalog(tmp_path: Path, entries: int = 100, idle: float = 60.0, max_bytes: int = 1 << 30) -> CodeCatalog:
    config = KernelConfig(
        data_dir=tmp_path, code_cache_entries=entries, code_cache_bytes=max_bytes,
        code_cache_idle_seconds=idle, git_roots=[str(tmp_path)],
    )  # fmt: skip
    plugins = Plugins()
    storage = plugins.storage(config.resolved_storage_url(), config)
    return CodeCatalog(storage, plugins.loaders(storage, config), {"python": SubprocessSandbox()}, config)


def publish(cat: CodeCatalog, version: str) -> str:
    return cat.publish(TENANT, "wf", "python", {"wf.py": workflow(version).encode()})[0]


def test_concurrent_first_uses_load_once(tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    ref = publish(cat, "v1")

    async def main() -> None:
        codes = await asyncio.gather(*(cat.get(TENANT, ref) for _ in range(50)))
        assert cat.loads == 1 and all(c is codes[0] for c in codes)
        assert codes[0].workflows == {"Flow": "wf"}
        await cat.get(TENANT, publish(cat, "v2"))
        assert cat.loads == 2

    asyncio.run(main())


def test_a_cancelled_first_caller_does_not_cancel_the_load(tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    ref = publish(cat, "v1")

    async def main() -> None:
        first = asyncio.create_task(cat.get(TENANT, ref))
        second = asyncio.create_task(cat.get(TENANT, ref))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second).bundle.ref == ref
        assert first.cancelled() and cat.loads == 1

    asyncio.run(main())


def test_failed_loads_are_shared_and_not_cached(tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    repo = GitRepo(tmp_path / "r.git")
    sha = repo.commit({"wf.py": workflow("v1")})
    pinned = f"git+file://{repo.path}@{sha}#gone.py"

    async def main() -> None:
        results = await asyncio.gather(*(cat.get(TENANT, pinned) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, NotFound) and "'gone.py'" in str(r) for r in results)
        assert cat.loads == 0 and len(cat) == 0

    asyncio.run(main())


def test_entry_module_alone_defines_the_workflows(tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    repo = GitRepo(tmp_path / "r.git")
    repo.commit({"wf.py": workflow("v1"), "a.py": workflow("shadow"), "b.py": workflow("x", cls="Other")})
    code = asyncio.run(cat.get(TENANT, cat.pin(TENANT, repo.ref())))
    assert code.workflows == {"Flow": "wf"} and code.bundle.entry == "wf"


def test_lru_is_bounded_by_entries(tmp_path: Path) -> None:
    cat = catalog(tmp_path, entries=2)
    one, two, three = (publish(cat, v) for v in ("v1", "v2", "v3"))

    async def main() -> None:
        for ref in (one, two, one, three):  # touching `one` makes `two` the least recently used
            await cat.get(TENANT, ref)
        assert (len(cat), cat.loads) == (2, 3)
        await cat.get(TENANT, one)
        assert cat.loads == 3
        await cat.get(TENANT, two)
        assert cat.loads == 4

    asyncio.run(main())


def test_lru_is_bounded_by_bytes(tmp_path: Path) -> None:
    size = len("wf.py") + len(workflow("v1").encode())
    cat = catalog(tmp_path, max_bytes=2 * size + 10)  # room for two bundles' source
    small = [publish(cat, v) for v in ("v1", "v2")]
    big = cat.publish(TENANT, "big", "python", {"wf.py": workflow("v3").encode() + b"#" * 3 * size})[0]

    async def main() -> None:
        for ref in small:
            await cat.get(TENANT, ref)
        assert (len(cat), cat.bytes) == (2, 2 * size)
        await cat.get(TENANT, big)  # over the bound alone: kept while in use, the others dropped
        assert len(cat) == 1 and cat.bytes > 3 * size
        await cat.get(TENANT, small[0])
        assert (len(cat), cat.bytes, cat.loads) == (1, size, 4)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_idle_code_is_swept_without_any_other_use(tmp_path: Path) -> None:
    cat = catalog(tmp_path, idle=0.2)
    refs = [publish(cat, f"v{i}") for i in range(20)]

    async def main() -> None:
        sweeper = asyncio.create_task(cat.sweep_forever())
        for ref in refs:
            await cat.get(TENANT, ref)
        # Loads on a busy machine can outlast the idle age, so earlier entries may already be gone;
        # the last one was just used, and only the sweeper can drop it now.
        assert len(cat) >= 1
        while len(cat):
            await asyncio.sleep(0.05)
        sweeper.cancel()
        await cat.get(TENANT, refs[0])  # evicted code loads again on its next use
        assert cat.loads == 21

    asyncio.run(main())


def test_a_load_after_eviction_starts_no_checker(tmp_path: Path) -> None:
    cat = catalog(tmp_path, entries=1)
    one, two = (publish(cat, v) for v in ("v1", "v2"))
    assert cat.checks == 2  # Publish checked each once

    async def main() -> None:
        for ref in (one, two, one, two):  # each get evicts the other
            assert (await cat.get(TENANT, ref)).workflows == {"Flow": "wf"}
        assert (cat.loads, cat.checks) == (4, 2)

    asyncio.run(main())


def test_code_this_kernel_never_checked_is_checked_before_use(tmp_path: Path) -> None:
    ref = publish(catalog(tmp_path), "v1")  # stored by another catalog (an older kernel, a restart)
    cat = catalog(tmp_path, entries=1)

    async def main() -> None:
        assert (await cat.get(TENANT, ref)).workflows == {"Flow": "wf"}
        assert cat.checks == 1
        await cat.get(TENANT, publish(cat, "v2"))  # evicts `ref`
        await cat.get(TENANT, ref)
        assert (cat.loads, cat.checks) == (3, 2)  # checked once, then only loaded

    asyncio.run(main())


def test_a_git_entry_is_checked_once_per_commit_and_path(tmp_path: Path) -> None:
    cat = catalog(tmp_path, entries=1)
    repo = GitRepo(tmp_path / "r.git")
    repo.commit({"wf.py": workflow("v1"), "other.py": workflow("x", cls="Other")})
    wf, other = (cat.pin(TENANT, repo.ref(path=path)) for path in ("wf.py", "other.py"))

    async def main() -> None:
        assert (await cat.get(TENANT, wf)).workflows == {"Flow": "wf"}
        assert (await cat.get(TENANT, other)).workflows == {"Other": "other"}
        checks = cat.checks  # same files, different entries: separate checks
        assert (await cat.get(TENANT, wf)).workflows == {"Flow": "wf"}
        assert (cat.loads, cat.checks) == (3, checks)

    asyncio.run(main())
