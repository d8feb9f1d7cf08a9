"""A tenant's repository cannot borrow another tenant's objects or repository (issue 16): every
object a git ref reads comes from under the tenant's own root. Real repositories, one root per
tenant (``--git-root <root>/{tenant}``); tenant ``a`` tries to run tenant ``b``'s code."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.plugins.loader_git.loader import GitLoader
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.plugins.loader_git.gitrepo import GitRepo, workflow
from tests.security.bystander import bystander_completes


def _loader(root: Path, data: Path) -> GitLoader:
    return GitLoader(KernelConfig(data_dir=data, git_roots=[f"{root}/{{tenant}}"]))


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, GitRepo, str]:
    """Tenant b's repository with its secret code; returns the roots, b's repo and its commit."""
    root = tmp_path / "roots"
    victim = GitRepo(root / "b" / "secret.git")
    sha = victim.commit({"wf.py": workflow("b's secret")})
    (root / "a").mkdir()
    return root, victim, sha


def _thief(root: Path, stolen_sha: str) -> GitRepo:
    """Tenant a's own repository, with a branch naming b's commit (a ref is just a file a can write)."""
    thief = GitRepo(root / "a" / "thief.git")
    thief.commit({"wf.py": workflow("a's own")})
    (thief.path / "refs" / "heads" / "stolen").write_text(stolen_sha + "\n")
    return thief


def _refused(loader: GitLoader, ref: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as err:
        loader.pin("a", ref)
    assert "b's secret" not in str(err.value)


def test_alternates_with_an_absolute_path_are_refused(
    tmp_path: Path, roots: tuple[Path, GitRepo, str]
) -> None:
    root, victim, sha = roots
    thief = _thief(root, sha)
    (thief.path / "objects" / "info" / "alternates").write_text(f"{victim.path / 'objects'}\n")
    _refused(_loader(root, tmp_path / "data"), thief.ref("stolen"), "alternates.*outside")


def test_alternates_with_a_relative_path_are_refused(
    tmp_path: Path, roots: tuple[Path, GitRepo, str]
) -> None:
    root, _, sha = roots
    thief = _thief(root, sha)
    (thief.path / "objects" / "info" / "alternates").write_text("../../../b/secret.git/objects\n")
    _refused(_loader(root, tmp_path / "data"), thief.ref("stolen"), "alternates.*outside")


def test_http_alternates_are_refused(tmp_path: Path, roots: tuple[Path, GitRepo, str]) -> None:
    root, victim, sha = roots
    thief = _thief(root, sha)
    (thief.path / "objects" / "info" / "http-alternates").write_text(f"{victim.path / 'objects'}\n")
    _refused(_loader(root, tmp_path / "data"), thief.ref("stolen"), "http-alternates")


def test_a_commondir_naming_another_tenants_repository_is_refused(
    tmp_path: Path, roots: tuple[Path, GitRepo, str]
) -> None:
    root, victim, _ = roots
    linked = root / "a" / "linked.git"  # a linked worktree's git directory: HEAD, commondir, gitdir
    linked.mkdir()
    (linked / "HEAD").write_text("ref: refs/heads/main\n")
    (linked / "commondir").write_text(f"{victim.path}\n")
    (linked / "gitdir").write_text(f"{tmp_path / 'elsewhere' / '.git'}\n")
    _refused(_loader(root, tmp_path / "data"), f"git+file://{linked}@main#wf.py", "commondir.*outside")


def test_a_symlinked_object_store_is_refused(tmp_path: Path, roots: tuple[Path, GitRepo, str]) -> None:
    root, victim, sha = roots
    thief = _thief(root, sha)
    for stored in (victim.path / "objects").glob("[0-9a-f][0-9a-f]"):  # b's commit, tree and blob
        fanout = thief.path / "objects" / stored.name
        shutil.rmtree(fanout, ignore_errors=True)
        fanout.symlink_to(stored)
    _refused(_loader(root, tmp_path / "data"), thief.ref("stolen"), "symlink.*outside")


def test_a_gitdir_pointer_to_another_tenant_is_refused(
    tmp_path: Path, roots: tuple[Path, GitRepo, str]
) -> None:
    root, victim, _ = roots
    work = root / "a" / "work"
    work.mkdir()
    (work / ".git").write_text(f"gitdir: {victim.path}\n")
    _refused(
        _loader(root, tmp_path / "data"), f"git+file://{work}@main#wf.py", "outside the allowed git roots"
    )


def test_alternates_inside_the_tenants_own_root_still_load(
    tmp_path: Path, roots: tuple[Path, GitRepo, str]
) -> None:
    root, _, _ = roots
    base = GitRepo(root / "a" / "base.git")
    sha = base.commit({"wf.py": workflow("a's shared base")})
    fork = GitRepo(root / "a" / "fork.git")
    (fork.path / "objects" / "info" / "alternates").write_text("../../base.git/objects\n")
    (fork.path / "refs" / "heads" / "main").write_text(sha + "\n")
    loader = _loader(root, tmp_path / "data")
    bundle = loader.load("a", loader.pin("a", fork.ref()))
    assert b"a's shared base" in bundle.files["wf.py"]


def test_a_normal_repository_still_loads(tmp_path: Path, roots: tuple[Path, GitRepo, str]) -> None:
    root, victim, sha = roots
    loader = _loader(root, tmp_path / "data")
    assert loader.pin("b", victim.ref()).endswith(f"@{sha}#wf.py")
    assert b"b's secret" in loader.load("b", loader.pin("b", victim.ref())).files["wf.py"]


# -- through a real kernel ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def git_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path]]:
    root = tmp_path_factory.mktemp("git-roots")
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--git-root", f"{root}/{{tenant}}"])
    k.start()
    yield k, root
    k.stop()


def test_a_kernel_refuses_borrowed_objects_and_serves_the_others(
    git_kernel: tuple[KernelProcess, Path], tenant: str
) -> None:
    kernel, root = git_kernel
    victim_tenant, thief_tenant = f"{tenant[:50]}-b", f"{tenant[:50]}-a"
    victim = GitRepo(root / victim_tenant / "secret.git")
    sha = victim.commit({"wf.py": workflow("b's secret")})
    thief = GitRepo(root / thief_tenant / "thief.git")
    thief.commit({"wf.py": workflow("a's own")})
    (thief.path / "refs" / "heads" / "stolen").write_text(sha + "\n")
    (thief.path / "objects" / "info" / "alternates").write_text(f"{victim.path / 'objects'}\n")
    with kernel.client() as client:
        with pytest.raises(TenantflowRpcError) as err:
            client.create(thief_tenant, "Flow", thief.ref("stolen"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "alternates" in err.value.message and "b's secret" not in err.value.message
        inst = client.create(victim_tenant, "Flow", victim.ref())
        assert Client.output(client.wait(victim_tenant, inst.id, timeout=20)) == "b's secret"
        bystander_completes(client, tenant)
