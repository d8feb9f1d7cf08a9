"""The suites' pytest plugin, loaded only when asked for (``-p``), never through an entry point.

``pytest -p tenantflow.conformance.plugin --pyargs tenantflow.conformance --tenantflow-storage
sqlite --tenantflow-runtime python --tenantflow-loader artifact`` runs each suite against what its
option names (each option may be given more than once); a suite whose option is not given is
skipped, saying so. Each name is looked up with the ``tenantflow_conformance`` hook among the
installed plugins, whose harness (:mod:`tenantflow.conformance.harness`) makes what the suite needs
and declares what the engine, runtime or loader lacks.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest

from tenantflow.client import Client
from tenantflow.conformance.harness import Harness, LoaderHarness, SandboxHarness, StorageHarness
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.kernel.plugins import Plugins

OPTIONS = {
    "storage_name": ("--tenantflow-storage", "NAME", "a storage URL scheme: sqlite, kv+lmdb, fdb ..."),
    "runtime": ("--tenantflow-runtime", "NAME", "a sandbox runtime: python, python-wasm, wasm ..."),
    "loader_scheme": ("--tenantflow-loader", "SCHEME", "a code-ref scheme: artifact, git+file ..."),
}
_counter = itertools.count()
_UNASKED = "tenantflow_unasked"  # the mark of a suite's tests whose option was not given


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tenantflow", "tenantflow conformance suites")
    for flag, metavar, what in OPTIONS.values():
        group.addoption(flag, action="append", default=[], metavar=metavar, help=f"run the suite on {what}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{_UNASKED}: a suite whose option was not given (deselected)")
    if not any(config.getoption(flag) for flag, _, _ in OPTIONS.values()):
        raise pytest.UsageError(
            "name what to test: " + ", ".join(f"{flag} {metavar}" for flag, metavar, _ in OPTIONS.values())
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, (flag, _, _) in OPTIONS.items():
        if fixture not in metafunc.fixturenames:
            continue
        chosen: list[str] = metafunc.config.getoption(flag)
        if chosen:
            metafunc.parametrize(fixture, chosen, scope="session")
        else:  # deselected below: a suite nobody asked for is not run (nor listed as skipped)
            unasked = pytest.param("", marks=pytest.mark.tenantflow_unasked, id="none")
            metafunc.parametrize(fixture, [unasked], scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unasked = [item for item in items if item.get_closest_marker(_UNASKED)]
    if unasked:
        config.hook.pytest_deselected(items=unasked)
        items[:] = [item for item in items if not item.get_closest_marker(_UNASKED)]


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


def harness(kind: str, name: str) -> Harness:
    """The harness the installed plugins give for ``kind`` ``name``; fails the test naming them if none."""
    plugins = Plugins()
    found = plugins.conformance(kind, name)
    if found is None:
        pytest.fail(
            f"no installed plugin gives a conformance harness for {kind} {name!r} "
            f"(installed: {', '.join(plugins.names())}){plugins.unavailable(name)}",
            pytrace=False,
        )
    return found


def require(harness: Harness, capability: str) -> None:
    """Skip the calling test, giving the harness's reason, when it declares it lacks ``capability``."""
    if capability in harness.lacks:
        pytest.skip(f"{harness.name} lacks {capability}: {harness.lacks[capability]}")


@pytest.fixture(scope="session")
def storage_harness(storage_name: str) -> StorageHarness:
    """The harness of the engine under test."""
    found = harness("storage", storage_name)
    assert isinstance(found, StorageHarness), found
    return found


@pytest.fixture(scope="session")
def sandbox_harness(runtime: str) -> SandboxHarness:
    """The harness of the runtime under test."""
    found = harness("sandbox", runtime)
    assert isinstance(found, SandboxHarness), found
    return found


@pytest.fixture(scope="session")
def loader_harness(loader_scheme: str) -> Iterator[LoaderHarness]:
    """The harness of the loader under test (closed at the end of the session)."""
    found = harness("loader", loader_scheme)
    assert isinstance(found, LoaderHarness), found
    yield found
    found.close()
