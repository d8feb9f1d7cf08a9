"""``ctx.workspace()`` in python-wasm steps, on a kernel with ``--workspace-root``: the run's instance
directory is a WASI preopen, so a step lists, reads and writes its workspace with ``os`` and
``open``, and reaches neither another instance's workspace nor anything a symlink points at."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.kernel.workspace import GUEST_DIR
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import source, wait_for

CODE = """
import os
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def tree(ws):
    return sorted(os.path.relpath(os.path.join(top, n), ws) for top, _, names in os.walk(ws) for n in names)


def attempt(fn):
    try:
        return fn()
    except OSError as exc:
        return type(exc).__name__


def read(path):
    with open(path) as f:
        return f.read()


class Work(WorkflowEntrypoint):
    def run(self, event, step):
        def first(ctx):
            ws = ctx.workspace()
            before = tree(ws)
            head = read(os.path.join(ws, "lint.toml"))
            os.makedirs(os.path.join(ws, "build"), exist_ok=True)
            with open(os.path.join(ws, "build", "out.txt"), "w") as f:
                f.write("built")
            os.remove(os.path.join(ws, "lint.toml"))
            return {"ws": ws, "files": before, "head": head}

        a = step.do("first", first, **ONCE)

        def second(ctx):
            ws = ctx.workspace()
            return {"same": ws == a["ws"], "kept": read(os.path.join(ws, "build", "out.txt")), "files": tree(ws)}

        b = step.do("second", second, **ONCE)
        if not event.payload.get("hold"):
            return {"a": a, "b": b}
        step.wait_for_event("release", type="release", timeout="1 hour")

        def planted(ctx):
            ws = ctx.workspace()
            return {name: attempt(lambda: read(os.path.join(ws, name))) for name in ("abs", "rel")}

        return {"a": a, "planted": step.do("planted", planted, **ONCE)}


class Snoop(WorkflowEntrypoint):
    def run(self, event, step):
        def snoop(ctx):
            ws = ctx.workspace()
            attempt(lambda: os.symlink("/etc", os.path.join(ws, "abs")))
            attempt(lambda: os.symlink("../../../../../../../../etc", os.path.join(ws, "rel")))
            return {"other": attempt(lambda: os.listdir(event.payload["other"])),
                    "up": attempt(lambda: os.listdir(os.path.join(ws, "..", ".."))),
                    "abs": attempt(lambda: os.listdir(os.path.join(ws, "abs"))),
                    "rel": attempt(lambda: os.listdir(os.path.join(ws, "rel")))}
        return step.do("snoop", snoop, **ONCE)
"""


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path]]:
    """A kernel with workspaces, and their root."""
    root = tmp_path_factory.mktemp("workspaces")
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--workspace-root", str(root)])
    k.start()
    yield k, root
    k.stop()


def _done(client: Client, tenant: str, id: str) -> object:
    done = client.wait(tenant, id, timeout=60)
    assert done.status == pb.STATUS_COMPLETE, done
    return Client.output(done)


def _host_tree(root: Path, id: str) -> Path:
    """The host path of instance ``id``'s workspace (found through the sweep's owner files)."""
    for name in os.listdir(root / "owners"):
        if json.loads((root / "owners" / name).read_text())["id"] == id:
            return next((root / "runs").glob(f"*/{name}")) / "tree"
    raise AssertionError(f"no workspace for {id}")


def test_a_python_wasm_step_lists_reads_and_writes_its_workspace(
    spaces: tuple[KernelProcess, Path], tenant: str
) -> None:
    kernel, root = spaces
    with kernel.client() as client:
        files = {"wf.py": source(CODE), "lint.toml": b"x = 1\n"}
        ref = client.publish(tenant, "work", files, runtime="python-wasm").ref
        out = _done(client, tenant, client.create(tenant, "Work", ref, params={}).id)
        assert out == {
            "a": {"ws": f"{GUEST_DIR}/tree", "files": ["lint.toml", "wf.py"], "head": "x = 1\n"},
            "b": {"same": True, "kept": "built", "files": ["build/out.txt", "wf.py"]},
        }
        wait_for(lambda: not os.listdir(root / "owners"))  # the instance ended: its workspace went


def test_a_python_wasm_step_reaches_no_other_workspace_nor_a_symlinks_target(
    spaces: tuple[KernelProcess, Path], tenant: str
) -> None:
    kernel, root = spaces
    with kernel.client() as client:
        ref = client.publish(
            tenant, "work", {"wf.py": source(CODE), "lint.toml": b""}, runtime="python-wasm"
        ).ref
        held = client.create(tenant, "Work", ref, params={"hold": True})
        wait_for(lambda: client.get(tenant, held.id).status == pb.STATUS_WAITING)
        other = _host_tree(root, held.id)
        assert (other / "build" / "out.txt").read_text() == "built"
        snoop = _done(client, tenant, client.create(tenant, "Snoop", ref, params={"other": str(other)}).id)
        assert isinstance(snoop, dict), snoop
        for name in ("other", "up", "abs", "rel"):  # an error's name, never a listing
            assert snoop[name] in ("PermissionError", "FileNotFoundError", "NotADirectoryError"), snoop
        # Links planted into the held workspace from outside lead nowhere either.
        os.symlink("/etc/hostname", other / "abs")
        os.symlink("../" * 12 + "etc/hostname", other / "rel")
        client.send_event(tenant, held.id, "release", {})
        out = _done(client, tenant, held.id)
        assert isinstance(out, dict) and set(out["planted"].values()) <= {
            "PermissionError",
            "FileNotFoundError",
        }, out
