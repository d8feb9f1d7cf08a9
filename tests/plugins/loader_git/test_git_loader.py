"""The git loader on real repositories: ref parsing, allowed roots, resolving revs, the bundle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, NotFound, ResourceExhausted
from tenantflow.plugins.loader_git.loader import GitLoader
from tenantflow.plugins.loader_git.ref import parse
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.plugins.loader_git.gitrepo import GitRepo, workflow

SHA = "0123456789abcdef0123456789abcdef01234567"


def loader(tmp_path: Path, *roots: str, max_code_bytes: int = 1 << 20) -> GitLoader:
    config = KernelConfig(data_dir=tmp_path / "data", git_roots=list(roots), max_code_bytes=max_code_bytes)
    return GitLoader(config)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    r = GitRepo(tmp_path / "root" / "acme" / "flows.git")
    r.commit({"wf.py": workflow("v1")})
    return r


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("git+ssh://host/x.git@main#wf.py", "scheme must be one of"),
        ("git+file://relative/x.git@main#wf.py", "absolute path"),
        ("git+file:///x.git@main#../wf.py", "relative path to a .py module"),
        ("git+file:///x.git@main#wf.txt", "relative path to a .py module"),
        ("git+file:///x.git@main#pkg/__init__.py", "not an importable module name"),
        ("git+file:///x.git@main#my-flow.py", "not an importable module name"),
        ("git+file:///x.git@ma..in#wf.py", "is not a branch, tag or commit name"),
        ("git+file:///x.git@main?sandbox=x#wf.py", "only runtime=<name>"),
        ("git+https://user:pw@host/x.git@main#wf.py", "without credentials"),
    ],
)
def test_bad_ref_forms(ref: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match="expected git\\+file:///") as err:
        parse(ref)
    assert why in str(err.value)


def test_ref_round_trip() -> None:
    ref = f"git+https://git.example.com/a/b.git@{SHA}?runtime=python-wasm#flows/deploy.py"
    git = parse(ref)
    assert (git.url, git.rev, git.path, git.runtime, git.entry, git.module_dir, git.pinned) == (
        "https://git.example.com/a/b.git", SHA, "flows/deploy.py", "python-wasm", "deploy", "flows", True)  # fmt: skip
    assert str(git) == ref


def test_git_refs_are_refused_without_roots(tmp_path: Path, repo: GitRepo) -> None:
    with pytest.raises(InvalidArgument, match="disabled on this kernel.*--git-root"):
        loader(tmp_path).pin("acme", repo.ref())
    with pytest.raises(InvalidArgument, match="git\\+https refs are disabled"):
        loader(tmp_path, str(tmp_path)).pin("acme", "git+https://example.com/x.git@main#wf.py")


def test_roots_scope_tenants_and_see_through_symlinks(tmp_path: Path, repo: GitRepo) -> None:
    per_tenant = loader(tmp_path, str(tmp_path / "root" / "{tenant}"))
    assert per_tenant.pin("acme", repo.ref()).endswith("#wf.py")
    with pytest.raises(InvalidArgument, match="not under a git root allowed for tenant 'other'"):
        per_tenant.pin("other", repo.ref())
    (tmp_path / "root" / "other").mkdir()
    os.symlink(repo.path, tmp_path / "root" / "other" / "link.git")  # inside other's root, to acme's repo
    with pytest.raises(InvalidArgument, match="not under a git root allowed for tenant 'other'"):
        per_tenant.pin("other", f"git+file://{tmp_path}/root/other/link.git@main#wf.py")
    with pytest.raises(InvalidArgument, match="not under a git root"):
        per_tenant.pin("other", f"git+file://{tmp_path}/root/other/../acme/flows.git@main#wf.py")
    with pytest.raises(InvalidArgument, match="not under a git root"):
        loader(tmp_path, "https://git.example.com/{tenant}").pin(
            "acme", "git+https://git.example.com/acme-evil/x.git@main#wf.py"
        )


def test_resolves_branch_tag_and_short_sha_to_one_commit(tmp_path: Path, repo: GitRepo) -> None:
    git = loader(tmp_path, str(tmp_path / "root"))
    first = repo.commit({"wf.py": workflow("v2")})
    repo.tag("release-1", first)
    repo.commit({"wf.py": workflow("v3")})
    pins = {git.pin("acme", repo.ref(rev)) for rev in ("release-1", first[:10], first)}
    assert pins == {f"git+file://{repo.path}@{first}#wf.py"}
    assert git.pin("acme", repo.ref("HEAD")) == git.pin("acme", repo.ref("main")) != pins.pop()


def test_missing_things_are_named(tmp_path: Path, repo: GitRepo) -> None:
    git = loader(tmp_path, str(tmp_path / "root"))
    repo.commit({"wf.py": workflow("v1"), "pkg.py/mod.py": "X = 1\n"})
    with pytest.raises(NotFound, match="no branch, tag or commit 'dev'"):
        git.pin("acme", repo.ref("dev"))
    with pytest.raises(NotFound, match="no file 'other.py' at commit"):
        git.pin("acme", repo.ref("main", "other.py"))
    with pytest.raises(InvalidArgument, match="'pkg.py' at commit .* is not a regular file"):
        git.pin("acme", repo.ref("main", "pkg.py"))
    with pytest.raises(InvalidArgument, match="is not pinned"):
        git.load("acme", repo.ref("main"))


def test_bundle_is_the_module_directory_tree(tmp_path: Path, repo: GitRepo) -> None:
    git = loader(tmp_path, str(tmp_path / "root"))
    repo.commit({
        "flows/wf.py": workflow("v1"), "flows/helpers.py": "H = 1\n", "flows/lib/__init__.py": "",
        "flows/README.md": "docs", "top.py": "T = 1\n",
    })  # fmt: skip
    bundle = git.load("acme", git.pin("acme", repo.ref("main", "flows/wf.py")))
    assert sorted(bundle.files) == ["helpers.py", "lib/__init__.py", "wf.py"]
    assert (bundle.entry, bundle.runtime) == ("wf", "python")
    assert bundle.files["helpers.py"] == b"H = 1\n"


def test_bundle_is_bounded(tmp_path: Path, repo: GitRepo) -> None:
    repo.commit({"wf.py": workflow("v1"), "big.py": b"#" * 5000})
    git = loader(tmp_path, str(tmp_path / "root"), max_code_bytes=4096)
    with pytest.raises(ResourceExhausted, match="4096 bytes"):
        git.load("acme", git.pin("acme", repo.ref()))


# -- through a real kernel ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def git_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path]]:
    root = tmp_path_factory.mktemp("git-roots")
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--git-root", f"{root}/{{tenant}}"])
    k.start()
    yield k, root
    k.stop()


SIBLINGS = """
from tenantflow.workflow import WorkflowEntrypoint
import helpers
from lib.fmt import shout

class Deploy(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("go", lambda: shout(helpers.GREETING))
"""


def test_workflow_imports_siblings_from_its_commit(
    git_kernel: tuple[KernelProcess, Path], tenant: str
) -> None:
    kernel, root = git_kernel
    repo = GitRepo(root / tenant / "app.git")
    sha = repo.commit({
        "ci/deploy.py": SIBLINGS, "ci/helpers.py": "GREETING = 'hi'\n", "ci/lib/__init__.py": "",
        "ci/lib/fmt.py": "def shout(s):\n    return s.upper() + '!'\n",
        "ci/other.py": workflow("x", cls="Other"),  # a sibling's workflow class is not a workflow here
    })  # fmt: skip
    with kernel.client() as client:
        inst = client.create(tenant, "Deploy", repo.ref("main", "ci/deploy.py"))
        assert inst.code == f"git+file://{repo.path}@{sha}#ci/deploy.py"
        done = client.wait(tenant, inst.id, timeout=30)
        assert Client.output(done) == "HI!", done.error
        with pytest.raises(Exception, match="defines no workflow class 'Other'.*it defines: Deploy"):
            client.create(tenant, "Other", repo.ref("main", "ci/deploy.py"))
