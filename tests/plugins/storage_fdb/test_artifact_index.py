"""Versions published before the kv engine indexed them are listed too, older than any since."""

from __future__ import annotations

from pathlib import Path

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.model import Artifact
from tenantflow.kernel.plugins import Plugins
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage


def test_versions_published_before_the_index_are_listed_below_newer_ones(tmp_path: Path) -> None:
    storage = Plugins().storage(f"kv+lmdb://{tmp_path / 'kv.lmdb'}", KernelConfig(data_dir=tmp_path))
    assert isinstance(storage, KVStorage)
    k = storage.k
    try:
        for name, digest, at in (("a", "1", 1.0), ("b", "2", 2.0), ("a", "3", 3.0)):
            storage.put_artifact(Artifact("t", name, digest * 64, "python", {"wf.py": b"x" * 200_000},
                                          {"W": "wf"}, at))  # fmt: skip

        def forget_index(tr) -> None:  # type: ignore[no-untyped-def]
            for index in ("av", "an", "avc", "avi"):
                tr.clear_range(*k.tenant_range("t", index))
                tr.clear(k.tenant("t", index))
            for name, digest in (("a", "1"), ("b", "2"), ("a", "3")):
                tr.clear(k.tenant("t", "a", name, "p", digest * 64))

        storage.layer.transact(forget_index)  # as a store written before the index
        storage.put_artifact(Artifact("t", "b", "4" * 64, "python", {"wf.py": b"y"}, {"W": "wf"}, 4.0))
        listed, _ = storage.list_artifacts("t", None, None, 10)
        assert [(v.name, v.digest[0]) for v in listed] == [("b", "4"), ("a", "3"), ("b", "2"), ("a", "1")]
        assert [v.digest[0] for v in storage.list_artifacts("t", "a", None, 10)[0]] == ["3", "1"]
        storage.put_artifact(
            Artifact("t", "a", "1" * 64, "python", {"wf.py": b"x" * 200_000}, {"W": "wf"}, 1.0)
        )
        assert [v.digest[0] for v in storage.list_artifacts("t", None, None, 10)[0]] == ["1", "4", "3", "2"]
    finally:
        storage.close()
