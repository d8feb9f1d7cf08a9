"""``ctx.workspace()`` against the python sandbox, on a kernel with ``--workspace-root``: a step gets
a writable tree of the instance's pinned code (a git commit's whole tree, an artifact's files),
kept across its steps, private to the instance, removed when it ends, within the tenant's quota.
A run reaches neither another instance's workspace nor the laid-out code it is made from."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import source, wait_for
from tests.plugins.loader_git.gitrepo import GitRepo
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's filters need Linux"
)

CODE = """
import os
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def tree(ws):
    return sorted(os.path.relpath(os.path.join(top, n), ws) for top, _, names in os.walk(ws) for n in names)


def peek(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return type(exc).__name__


class Work(WorkflowEntrypoint):
    def run(self, event, step):
        def first(ctx):
            ws = ctx.workspace()
            before = tree(ws)
            path = os.path.join(ws, "wf.py")
            try:
                with open(path, "a") as f:  # in place: copied up (overlay)
                    f.write("# edited by the step\\n")
            except PermissionError:  # a link farm's files are read-only: replaced, as git does
                with open(path) as f, open(path + ".new", "w") as new:
                    new.write(f.read() + "# edited by the step\\n")
                os.replace(path + ".new", path)
            os.makedirs(os.path.join(ws, "build"), exist_ok=True)
            with open(os.path.join(ws, "build", "out.bin"), "wb") as f:
                f.write(b"x" * event.payload.get("write", 10))
            return {"ws": ws, "files": before}

        a = step.do("first", first, **ONCE)

        def second(ctx):
            ws = ctx.workspace()
            with open(os.path.join(ws, "wf.py")) as f:
                edited = f.read().endswith("# edited by the step\\n")
            return {"same": ws == a["ws"], "edited": edited, "files": tree(ws)}

        b = step.do("second", second, **ONCE)
        if event.payload.get("hold"):
            step.wait_for_event("release", type="release", timeout="1 hour")
        return {"a": a, "b": b}


class Snoop(WorkflowEntrypoint):
    def run(self, event, step):
        def snoop(ctx):
            mine = ctx.workspace()
            runs = os.path.dirname(os.path.dirname(os.path.dirname(mine)))
            return {"other": peek(event.payload["other"]), "runs": peek(runs),
                    "lower": peek(os.path.join(os.path.dirname(runs), "lower")),
                    "uppers": peek(os.path.join(os.path.dirname(runs), "uppers"))}
        return step.do("snoop", snoop, **ONCE)


class NoWorkspace(WorkflowEntrypoint):
    def run(self, event, step):
        def ask(ctx):
            try:
                return ctx.workspace()
            except RuntimeError as exc:
                return str(exc)
        return step.do("ask", ask, **ONCE)
"""


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path, Path]]:
    """A kernel with workspaces (1 MiB quota per tenant) and a git root; both paths."""
    root, git = tmp_path_factory.mktemp("workspaces"), tmp_path_factory.mktemp("git")
    args = [*TEST_LIMITS, "--workspace-root", str(root), "--workspace-quota-mb", "1", "--git-root", str(git)]
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), args)
    k.start()
    yield k, root, git
    k.stop()


def _done(client: Client, tenant: str, id: str) -> object:
    done = client.wait(tenant, id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE, done
    return Client.output(done)


def test_a_workspace_holds_the_pinned_files_and_is_the_instances_own(
    spaces: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, root, _ = spaces
    with kernel.client() as client:
        ref = client.publish(tenant, "work", {"wf.py": source(CODE), "lint.toml": b"x = 1\n"}).ref
        first = _done(client, tenant, client.create(tenant, "Work", ref, params={}).id)
        assert isinstance(first, dict)
        assert first["a"]["files"] == ["lint.toml", "wf.py"]
        assert first["b"] == {"same": True, "edited": True, "files": ["build/out.bin", "lint.toml", "wf.py"]}
        # Another instance of the same code starts from the pinned files, not the first one's edits.
        second = _done(client, tenant, client.create(tenant, "Work", ref, params={}).id)
        assert isinstance(second, dict) and second["a"]["files"] == ["lint.toml", "wf.py"]
        assert second["a"]["ws"] != first["a"]["ws"]
        # Both instances ended: their workspaces go.
        wait_for(lambda: not os.path.exists(first["a"]["ws"]) and not os.path.exists(second["a"]["ws"]))
        wait_for(lambda: not os.listdir(root / "owners"))


def test_a_run_reaches_no_other_instances_workspace(
    spaces: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, _, _ = spaces
    with kernel.client() as client:
        ref = client.publish(tenant, "work", {"wf.py": source(CODE)}).ref
        held = client.create(tenant, "Work", ref, params={"hold": True})
        wait_for(lambda: client.get(tenant, held.id).status == pb.STATUS_WAITING)
        history_ws = _workspace_of(client, tenant, held.id)  # kept while the instance waits
        assert os.path.isdir(history_ws)
        other = f"{tenant[:50]}-other"
        other_ref = client.publish(other, "work", {"wf.py": source(CODE)}).ref
        snoop = _done(
            client, other, client.create(other, "Snoop", other_ref, params={"other": history_ws}).id
        )
        assert snoop == {"other": "PermissionError", "runs": "PermissionError", "lower": "PermissionError",
                         "uppers": "PermissionError"}  # fmt: skip
        # The same tenant's other instance is no closer.
        same = _done(client, tenant, client.create(tenant, "Snoop", ref, params={"other": history_ws}).id)
        assert isinstance(same, dict) and same["other"] == "PermissionError"
        bystander_completes(client, tenant)
        client.send_event(tenant, held.id, "release", {})
        _done(client, tenant, held.id)
        wait_for(lambda: not os.path.exists(history_ws))


def _workspace_of(client: Client, tenant: str, id: str) -> str:
    """The workspace path the held instance's first step recorded."""
    steps = {s.name: s for s in client.get(tenant, id).steps}
    return str(json.loads(steps["first"].output_json)["ws"])


def test_a_git_workspace_is_the_commits_whole_tree(
    spaces: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, _, git = spaces
    repo = GitRepo(git / "ci.git")
    repo.commit({"flows/wf.py": source(CODE), "README.md": "# ci\n", "src/app/main.c": "int main;\n"})
    with kernel.client() as client:
        ref = repo.ref("main", "flows/wf.py")
        out = _done(client, tenant, client.create(tenant, "Work", ref, params={}).id)
        assert isinstance(out, dict)
        assert out["a"]["files"] == ["README.md", "flows/wf.py", "src/app/main.c"]


def test_the_tenants_quota_bounds_new_workspaces(
    spaces: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, _, _ = spaces
    with kernel.client() as client:
        ref = client.publish(tenant, "work", {"wf.py": source(CODE)}).ref
        big = client.create(tenant, "Work", ref, params={"hold": True, "write": 2 * 1024 * 1024})
        wait_for(lambda: client.get(tenant, big.id).status == pb.STATUS_WAITING)
        refused = client.wait(tenant, client.create(tenant, "Work", ref, params={}).id, timeout=30)
        assert refused.status == pb.STATUS_ERRORED
        assert "over its quota of 1048576" in refused.error.message
        client.send_event(tenant, big.id, "release", {})
        _done(client, tenant, big.id)


def test_without_a_workspace_root_a_step_is_told_why(client: Client, tenant: str) -> None:
    ref = client.publish(tenant, "work", {"wf.py": source(CODE)}).ref
    out = _done(client, tenant, client.create(tenant, "NoWorkspace", ref, params={}).id)
    assert out == "this kernel gives steps no workspace: its operator starts it with --workspace-root DIR"
