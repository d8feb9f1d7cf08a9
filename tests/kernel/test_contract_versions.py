"""Contract versions: a plugin made for other versions of a contract it implements is refused at
start, naming the plugin and both versions (kernel/contracts.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.contracts import CONTRACTS, ContractMismatch
from tenantflow.kernel.loader import CodeBundle, Loader
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.storage import Storage


class FutureLoader:
    """A loader plugin written for a loader contract this kernel does not have yet."""

    TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [CONTRACTS["loader"] + 1, CONTRACTS["loader"] + 2]}

    class _Loader:
        schemes = ("future",)

        def pin(self, tenant: str, ref: str) -> str:
            return ref

        def load(self, tenant: str, pinned: str) -> CodeBundle:
            return CodeBundle(pinned, "python", {})

    @hookimpl
    def tenantflow_loaders(self, storage: Storage, config: KernelConfig) -> list[Loader]:
        return [self._Loader()]


def test_a_plugin_for_other_versions_is_refused_naming_them() -> None:
    version = CONTRACTS["loader"]
    with pytest.raises(ContractMismatch) as err:
        Plugins(extra=[FutureLoader()])
    assert f"the FutureLoader plugin supports loader contract {version + 1}, {version + 2}" in str(err.value)
    assert f"this kernel has loader {version}" in str(err.value)


def test_a_plugin_that_also_supports_this_version_loads() -> None:
    plugin = FutureLoader()
    plugin.TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [CONTRACTS["loader"], 99]}  # type: ignore[misc]
    assert Plugins(extra=[plugin]).pm.is_registered(plugin)


def test_a_plugin_must_declare_each_contract_whose_hook_it_implements() -> None:
    plugin = FutureLoader()
    plugin.TENANTFLOW_CONTRACTS = {"hookspecs": [1]}  # type: ignore[misc]
    with pytest.raises(ContractMismatch, match="declares no loader contract version"):
        Plugins(extra=[plugin])
    plugin.TENANTFLOW_CONTRACTS = None  # type: ignore[misc]
    with pytest.raises(
        ContractMismatch, match=r"add TENANTFLOW_CONTRACTS = \{'hookspecs': \[1\], 'loader': \[1\]\}"
    ):
        Plugins(extra=[plugin])


def test_serve_refuses_to_start_with_an_entry_point_plugin_of_another_version(tmp_path: Path) -> None:
    """A plugin installed the ordinary way (a distribution's ``tenantflow`` entry point)."""
    site = tmp_path / "site"
    (site / "old_storage-0.1.dist-info").mkdir(parents=True)
    (site / "old_storage-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: old-storage\nVersion: 0.1\n"
    )
    (site / "old_storage-0.1.dist-info" / "entry_points.txt").write_text("[tenantflow]\nold = old_storage\n")
    (site / "old_storage.py").write_text(
        textwrap.dedent("""
        from tenantflow.kernel import hookimpl

        TENANTFLOW_CONTRACTS = {"hookspecs": [1], "storage": [0]}


        @hookimpl
        def tenantflow_storage(url, config):
            return None
    """)
    )
    cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(tmp_path / "data")]  # fmt: skip
    done = subprocess.run(
        cmd,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert (
        f"the old plugin supports storage contract 0; this kernel has storage {CONTRACTS['storage']}"
        in done.stderr
    )
    assert "listening on" not in done.stdout
