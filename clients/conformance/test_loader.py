"""Every code loader against a real kernel: resolve, pin, load, bad refs, and versions for life
(across new versions, Restart and a SIGKILLed kernel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.conformance.harness import LoaderHarness, LoaderSource
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.conformance.workflows import versioned as workflow
from tenantflow.v1 import tenantflow_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
WAITING = frozenset({pb.STATUS_WAITING})


@pytest.fixture(scope="session")
def loader_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the loader's harness keeps its code in (shared by the session's kernels)."""
    return tmp_path_factory.mktemp("loader-root")


def serve(data_dir: Path, harness: LoaderHarness, root: Path) -> KernelProcess:
    k = KernelProcess(data_dir, [*TEST_LIMITS, *harness.kernel_args(root)], harness.kernel_env(root))
    k.start()
    return k


@pytest.fixture(scope="module")
def loader_kernel(
    tmp_path_factory: pytest.TempPathFactory, loader_harness: LoaderHarness, loader_root: Path
) -> Iterator[KernelProcess]:
    k = serve(tmp_path_factory.mktemp("kernel"), loader_harness, loader_root)
    yield k
    k.stop()


@pytest.fixture
def lclient(loader_kernel: KernelProcess) -> Iterator[Client]:
    with loader_kernel.client() as c:
        yield c


@pytest.fixture
def src(loader_harness: LoaderHarness, tenant: str, loader_root: Path) -> LoaderSource:
    return loader_harness.source(tenant, loader_root)


def run(client: Client, tenant: str, ref: str, workflow: str = "Flow") -> pb.Instance:
    return client.create(tenant, workflow, ref)


def output(client: Client, tenant: str, id: str) -> object:
    inst = client.wait(tenant, id, timeout=30)
    assert inst.status == pb.STATUS_COMPLETE, inst.error
    return Client.output(inst)


def test_unpinned_ref_is_pinned_at_create(src: LoaderSource, lclient: Client) -> None:
    ref = src.release(lclient, workflow("v1"))
    inst = run(lclient, src.tenant, ref)
    assert src.pinned().match(inst.code), inst.code
    assert output(lclient, src.tenant, inst.id) == "v1"
    again = run(lclient, src.tenant, inst.code)  # a pinned ref pins to itself
    assert again.code == inst.code
    assert output(lclient, src.tenant, again.id) == "v1"


def test_bad_refs_fail_create_naming_what_is_missing(src: LoaderSource, lclient: Client) -> None:
    src.release(lclient, workflow("v1"))
    for ref, code, fragment in src.bad:
        with pytest.raises(TenantflowRpcError) as err:
            run(lclient, src.tenant, ref)
        assert err.value.code == code and fragment in err.value.message, (ref, err.value)


def test_no_such_class_fails_create(src: LoaderSource, lclient: Client) -> None:
    ref = src.release(lclient, workflow("v1"))
    with pytest.raises(TenantflowRpcError) as err:
        run(lclient, src.tenant, ref, workflow="Missing")
    assert err.value.code == INVALID and "no workflow class 'Missing'" in err.value.message
    assert "Flow" in err.value.message


def test_instance_keeps_its_version_for_life(src: LoaderSource, lclient: Client) -> None:
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


def test_version_for_life_across_kernel_kill(
    src: LoaderSource, tmp_path: Path, loader_harness: LoaderHarness, loader_root: Path
) -> None:
    k = serve(tmp_path / "kernel", loader_harness, loader_root)
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
