"""Every code loader against a real kernel: resolve, pin, load, bad refs, and versions for life
(across new versions, Restart and a SIGKILLed kernel)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.plugins.loader_git.gitrepo import GitRepo, workflow

NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
WAITING = frozenset({pb.STATUS_WAITING})


@dataclass
class Source:
    """Where one loader's code comes from; :meth:`release` makes a new version under the same name."""

    kind: str
    tenant: str
    root: Path
    repo: GitRepo | None = None
    bad: list[tuple[str, grpc.StatusCode, str]] = field(default_factory=list)

    def release(self, client: Client, code: str) -> str:
        """Publish ``code`` as the newest version; return the *unpinned* ref to it."""
        if self.repo is not None:
            self.repo.commit({"wf.py": code})
            return self.repo.ref("main")
        client.publish(self.tenant, "wf", {"wf.py": code})
        return f"artifact://{self.tenant}/wf"

    def pinned(self) -> re.Pattern[str]:
        if self.repo is not None:
            return re.compile(rf"^git\+file://{re.escape(str(self.repo.path))}@[0-9a-f]{{40}}#wf\.py$")
        return re.compile(rf"^artifact://{re.escape(self.tenant)}/wf@sha256:[0-9a-f]{{64}}$")


@pytest.fixture(scope="module")
def git_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("git-root")


def serve(data_dir: Path, git_root: Path) -> KernelProcess:
    k = KernelProcess(data_dir, [*TEST_LIMITS, "--git-root", str(git_root)])
    k.start()
    return k


@pytest.fixture(scope="module")
def loader_kernel(tmp_path_factory: pytest.TempPathFactory, git_root: Path) -> Iterator[KernelProcess]:
    k = serve(tmp_path_factory.mktemp("kernel"), git_root)
    yield k
    k.stop()


@pytest.fixture
def lclient(loader_kernel: KernelProcess) -> Iterator[Client]:
    with loader_kernel.client() as c:
        yield c


@pytest.fixture
def src(loader_scheme: str, tenant: str, git_root: Path) -> Source:
    if loader_scheme == "artifact":
        return Source("artifact", tenant, git_root, bad=[
            (f"artifact://{tenant}/nope", NOT_FOUND, "'nope' was never published"),
            (f"artifact://{tenant}/wf@sha256:{'0' * 64}", NOT_FOUND, f"sha256:{'0' * 64}"),
            ("artifact://someone-else/wf", NOT_FOUND, "not found in tenant"),
            (f"artifact://{tenant}", INVALID, "expected artifact://"),
        ])  # fmt: skip
    repo = GitRepo(git_root / f"{tenant}.git")
    repo.commit({"wf.py": "def broken(:\n"}, branch="broken")
    return Source("git", tenant, git_root, repo, bad=[
        (f"git+file://{git_root}/missing.git@main#wf.py", NOT_FOUND, "no git repository"),
        (repo.ref("nope"), NOT_FOUND, "no branch, tag or commit 'nope'"),
        (repo.ref("f" * 40), NOT_FOUND, f"commit {'f' * 40!r}"),
        (repo.ref("main", "missing.py"), NOT_FOUND, "no file 'missing.py'"),
        (repo.ref("broken"), INVALID, "wf.py, line 1"),
        ("git+file:///etc/repo.git@main#wf.py", INVALID, "not under a git root"),
        (f"git+file://{repo.path}#wf.py", INVALID, "no '@<branch|tag|commit>'"),
        (f"git+file://{repo.path}@main", INVALID, "no module path"),
    ])  # fmt: skip


def run(client: Client, tenant: str, ref: str, workflow: str = "Flow") -> pb.Instance:
    return client.create(tenant, workflow, ref)


def output(client: Client, tenant: str, id: str) -> object:
    inst = client.wait(tenant, id, timeout=30)
    assert inst.status == pb.STATUS_COMPLETE, inst.error
    return Client.output(inst)


def test_unpinned_ref_is_pinned_at_create(src: Source, lclient: Client) -> None:
    ref = src.release(lclient, workflow("v1"))
    inst = run(lclient, src.tenant, ref)
    assert src.pinned().match(inst.code), inst.code
    assert output(lclient, src.tenant, inst.id) == "v1"
    again = run(lclient, src.tenant, inst.code)  # a pinned ref pins to itself
    assert again.code == inst.code
    assert output(lclient, src.tenant, again.id) == "v1"


def test_bad_refs_fail_create_naming_what_is_missing(src: Source, lclient: Client) -> None:
    src.release(lclient, workflow("v1"))
    for ref, code, fragment in src.bad:
        with pytest.raises(TenantflowRpcError) as err:
            run(lclient, src.tenant, ref)
        assert err.value.code == code and fragment in err.value.message, (ref, err.value)


def test_no_such_class_fails_create(src: Source, lclient: Client) -> None:
    ref = src.release(lclient, workflow("v1"))
    with pytest.raises(TenantflowRpcError) as err:
        run(lclient, src.tenant, ref, workflow="Missing")
    assert err.value.code == INVALID and "no workflow class 'Missing'" in err.value.message
    assert "Flow" in err.value.message


def test_instance_keeps_its_version_for_life(src: Source, lclient: Client) -> None:
    ref = src.release(lclient, workflow("v1", sleep=1.0))
    old = run(lclient, src.tenant, ref)
    lclient.wait(src.tenant, old.id, WAITING)
    src.release(lclient, workflow("v2"))
    new = run(lclient, src.tenant, ref)
    assert new.code != old.code
    assert output(lclient, src.tenant, new.id) == "v2"
    assert output(lclient, src.tenant, old.id) == "v1"  # woke up after v2 was out: still v1
    lclient.restart(src.tenant, old.id)
    assert output(lclient, src.tenant, old.id) == "v1"  # Restart reruns the pinned code too


def test_version_for_life_across_kernel_kill(src: Source, tmp_path: Path) -> None:
    k = serve(tmp_path / "kernel", src.root)
    try:
        with k.client() as c:
            ref = src.release(c, workflow("v1", sleep=1.5))
            old = run(c, src.tenant, ref)
            c.wait(src.tenant, old.id, WAITING)
            src.release(c, workflow("v2"))
        k.kill()
        k.start()
        with k.client() as c:
            new = run(c, src.tenant, ref)
            assert output(c, src.tenant, new.id) == "v2"
            assert output(c, src.tenant, old.id) == "v1"
    finally:
        k.stop()
