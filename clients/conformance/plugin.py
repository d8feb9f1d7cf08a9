"""The suites' pytest plugin, loaded only when asked for (``-p``), never through an entry point.

``pytest -p tenantflow.conformance.plugin --pyargs tenantflow.conformance --tenantflow-storage
sqlite --tenantflow-runtime python --tenantflow-loader artifact`` runs each suite against what its
option names (each option may be given more than once); a suite whose option is not given is
skipped, saying so.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest

from tenantflow.client import Client
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess

OPTIONS = {
    "storage_name": ("--tenantflow-storage", "NAME", "a storage URL scheme: sqlite, kv+lmdb, fdb ..."),
    "runtime": ("--tenantflow-runtime", "NAME", "a sandbox runtime: python, python-wasm, wasm ..."),
    "loader_scheme": ("--tenantflow-loader", "SCHEME", "a code-ref scheme: artifact, git+file ..."),
}
_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tenantflow", "tenantflow conformance suites")
    for flag, metavar, what in OPTIONS.values():
        group.addoption(flag, action="append", default=[], metavar=metavar, help=f"run the suite on {what}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, (flag, _, _) in OPTIONS.items():
        if fixture not in metafunc.fixturenames:
            continue
        chosen: list[str] = metafunc.config.getoption(flag)
        if chosen:
            metafunc.parametrize(fixture, chosen, scope="session")
        else:
            skip = pytest.mark.skip(reason=f"no {flag} given")
            metafunc.parametrize(fixture, [pytest.param("", marks=skip)], ids=["none"], scope="session")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """One kernel shared by the session (SQLite storage); tests isolate themselves by tenant."""
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), TEST_LIMITS)
    k.start()
    yield k
    k.stop()


@pytest.fixture
def client(kernel: KernelProcess) -> Iterator[Client]:
    """A client of the shared kernel."""
    with kernel.client() as c:
        yield c


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A tenant name unique to this test."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    return f"t{next(_counter)}-{name}"[:60].rstrip("-.")
