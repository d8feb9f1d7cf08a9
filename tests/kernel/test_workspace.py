"""kernel/workspace.py on a real directory: the code laid out once, a link farm per instance whose
files cannot be written in place, an overlay (root kernels) whose writes stay in the instance's
upper, removal, and the quota counting only what steps wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tenantflow.kernel.workspace import QuotaExceeded, Workspaces

FILES = [
    ("wf.py", b"x = 1\n", False),
    ("pkg/run.sh", b"#!/bin/sh\n", True),
    ("pkg/deep/data.txt", b"d", False),
]


def _tree(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(t, n), path) for t, _, names in os.walk(path) for n in names)


def test_a_link_farm_shares_the_laid_out_files_read_only(tmp_path: Path) -> None:
    spaces = Workspaces(tmp_path / "ws", mode="links")
    calls: list[int] = []

    def files() -> list[tuple[str, bytes, bool]]:
        calls.append(1)
        return FILES

    a = spaces.workspace("acme", "i1", "artifact://acme/w@sha256:1", files)
    b = spaces.workspace("acme", "i2", "artifact://acme/w@sha256:1", files)
    assert calls == [1]  # laid out once, linked twice
    assert _tree(a) == _tree(b) == ["pkg/deep/data.txt", "pkg/run.sh", "wf.py"]
    assert os.stat(f"{a}/wf.py").st_ino == os.stat(f"{b}/wf.py").st_ino
    assert oct(os.stat(f"{a}/wf.py").st_mode & 0o777) == oct(0o444)
    assert oct(os.stat(f"{a}/pkg/run.sh").st_mode & 0o777) == oct(0o555)
    assert spaces.workspace("acme", "i1", "artifact://acme/w@sha256:1", files) == a  # kept
    spaces.remove("acme", "i1")
    assert not os.path.exists(a) and os.path.exists(f"{b}/wf.py")


def test_the_quota_counts_what_steps_wrote_not_the_links(tmp_path: Path) -> None:
    spaces = Workspaces(tmp_path / "ws", quota_bytes=64 * 1024, mode="links")
    a = spaces.workspace("acme", "i1", "ref", lambda: FILES)
    assert spaces.usage("acme") == 0
    Path(a, "big.bin").write_bytes(b"x" * 128 * 1024)
    assert spaces.usage("acme") >= 128 * 1024 and spaces.usage("other") == 0
    with pytest.raises(QuotaExceeded, match="over its quota of 65536"):
        spaces.workspace("acme", "i2", "ref", lambda: FILES)
    spaces.workspace("other", "i1", "ref", lambda: FILES)  # another tenant's quota is its own


@pytest.mark.skipif(os.geteuid() != 0, reason="an overlay needs a root kernel")
def test_an_overlay_keeps_writes_in_the_instances_upper(tmp_path: Path) -> None:
    spaces = Workspaces(tmp_path / "ws")
    assert spaces.mode == "overlay"
    try:
        a = spaces.workspace("acme", "i1", "ref", lambda: FILES)
        b = spaces.workspace("acme", "i2", "ref", lambda: FILES)
        with open(f"{a}/wf.py", "a") as f:  # in place: copied up into i1's upper only
            f.write("y = 2\n")
        assert Path(a, "wf.py").read_text() == "x = 1\ny = 2\n" and Path(b, "wf.py").read_text() == "x = 1\n"
        assert spaces.usage("acme") > 0
        spaces.remove("acme", "i1")
        assert not os.path.exists(a) and Path(b, "wf.py").read_text() == "x = 1\n"
    finally:
        spaces.close()


def test_a_link_farm_is_made_ahead_and_taken_whole_by_the_next_instance(tmp_path: Path) -> None:
    spaces = Workspaces(tmp_path / "ws", mode="links")
    a = spaces.workspace("acme", "i1", "ref", lambda: FILES)  # made on the spot; a spare follows
    assert spaces.wait_spares()
    spare = next((tmp_path / "ws" / "spares").iterdir())
    spare_dir = os.stat(spare / "pkg").st_ino
    b = spaces.workspace("acme", "i2", "ref", lambda: FILES)
    assert os.stat(f"{b}/pkg").st_ino == spare_dir  # the spare itself, renamed into place
    assert _tree(b) == _tree(a) and os.stat(f"{b}/wf.py").st_ino == os.stat(f"{a}/wf.py").st_ino
    Path(a, "pkg", "new.txt").write_text("a's own")  # directories are the instance's: nothing shared
    assert not Path(b, "pkg", "new.txt").exists()
    assert spaces.wait_spares() and _tree(str(spare)) == _tree(b)  # the next one, made ahead again
    assert spaces.usage("acme") > 0 and len(list((tmp_path / "ws" / "spares").iterdir())) == 1


def test_a_half_made_spare_of_a_kernel_that_is_gone_is_dropped(tmp_path: Path) -> None:
    Workspaces(tmp_path / "ws", mode="links")
    orphan = tmp_path / "ws" / "spares" / f"{'0' * 32}.{2**22 + 12345}.1"
    (orphan / "pkg").mkdir(parents=True)
    Workspaces(tmp_path / "ws", mode="links")
    assert not orphan.exists()
