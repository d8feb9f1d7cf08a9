"""The fdb, git and wasm plugins are extras: without them a kernel runs Python workflows, and asking
for what only a missing plugin handles names the extra to install.

Each case runs Python with a ``sitecustomize`` that makes the extras' modules fail to import, as
they do where the extra is not installed; the last installs the package without extras for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

BLOCKER = """
import os, sys

BLOCKED = set(os.environ["TENANTFLOW_TEST_BLOCK"].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""
EXTRAS_MODULES = "fdb,lmdb,pygit2,wasmtime,componentize_py"

HELLO = """
from tenantflow.workflow import WorkflowEntrypoint

class Hello(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("greet", lambda: "hello " + event.payload["who"])
"""


@pytest.fixture
def without_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment (also of kernels started from here) in which the extras' modules are missing."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("TENANTFLOW_TEST_BLOCK", EXTRAS_MODULES)
    return dict(os.environ)


PROBE = """
import json
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.plugins import Plugins

plugins = Plugins()
errors = {}
for url in ("fdb://", "kv+lmdb:///nowhere"):
    try:
        plugins.storage(url, KernelConfig())
    except Exception as exc:
        errors[url] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"names": plugins.names(), "unloaded": sorted(plugins.unloaded), "errors": errors}))
"""


def test_the_rest_load_and_storage_urls_name_the_fdb_extra(without_extras: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=without_extras, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert {"sqlite", "subprocess", "artifact"} <= set(probe["names"])
    assert not {"fdb", "git", "wasm"} & set(probe["names"]), probe
    assert probe["unloaded"] == ["fdb", "git", "wasm"]
    installed = [n for n in probe["names"]]
    assert probe["errors"]["fdb://"] == (
        f"InvalidArgument: no installed storage plugin handles 'fdb://' (installed: {installed}); "
        "the fdb plugin could not load (No module named 'fdb'): pip install 'tenantflow[fdb]'"
    )
    lmdb = probe["errors"]["kv+lmdb:///nowhere"]
    assert "pip install 'tenantflow[fdb]'" in lmdb and "[git]" not in lmdb and "[wasm]" not in lmdb, lmdb


def test_a_kernel_without_extras_runs_python_and_names_the_extra_asked_for(
    without_extras: dict[str, str], tmp_path: Path, tenant: str
) -> None:
    kernel = KernelProcess(tmp_path / "kernel", TEST_LIMITS)
    kernel.start()
    try:
        with Client(kernel.address) as client:
            ref = publish(client, tenant, HELLO)
            inst = client.create(tenant, "Hello", ref, params={"who": "world"})
            done = client.wait(tenant, inst.id)
            assert done.status == pb.STATUS_COMPLETE, done
            assert Client.output(done) == "hello world"

            with pytest.raises(TenantflowRpcError) as wasm:
                publish(client, tenant, HELLO, runtime="python-wasm")
            assert wasm.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert (
                "the wasm plugin could not load (No module named 'wasmtime'): pip install 'tenantflow[wasm]'"
                in (wasm.value.message)
            )
            assert "[git]" not in wasm.value.message and "[fdb]" not in wasm.value.message

            with pytest.raises(TenantflowRpcError) as git:
                client.create(tenant, "Hello", "git+file:///srv/repo.git@main#hello.py")
            assert git.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert (
                "the git plugin could not load (No module named 'pygit2'): pip install 'tenantflow[git]'"
                in (git.value.message)
            )
            assert "[wasm]" not in git.value.message
    finally:
        kernel.stop()
    assert any("pip install 'tenantflow[fdb]'" in line for line in kernel.lines), kernel.lines


def _source_tree(dest: Path) -> Path:
    """The package's sources (what ``pip install .`` reads), copied so the build writes nothing here."""
    root = Path(__file__).resolve().parents[2]
    skip = shutil.ignore_patterns("__pycache__", "node_modules")
    for name in ("proto", "kernel", "plugins", "clients"):
        shutil.copytree(root / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, dest / name)
    return dest


@pytest.mark.timeout(300)
def test_a_default_install_runs_a_python_workflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> None:
    """``pip install tenantflow`` without extras: none of their packages, and a python workflow runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    source = _source_tree(tmp_path / "src")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    found = subprocess.run(
        [
            str(python),
            "-c",
            f"import importlib.util as u; print([m for m in {EXTRAS_MODULES.split(',')!r} if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]", found.stdout

    kernel = KernelProcess(tmp_path / "kernel", TEST_LIMITS)
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", str(python))  # the kernel runs from the new install
        m.delenv("PYTHONPATH", raising=False)
        kernel.start()
    try:
        with Client(kernel.address) as client:
            ref = publish(client, tenant, HELLO)
            done = client.wait(tenant, client.create(tenant, "Hello", ref, params={"who": "pip"}).id)
            assert done.status == pb.STATUS_COMPLETE, done
            assert Client.output(done) == "hello pip"
    finally:
        kernel.stop()
    assert any("tenantflow[wasm]" in line for line in kernel.lines), kernel.lines
