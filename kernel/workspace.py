"""Workspaces: a writable tree of an instance's pinned code (``ctx.workspace()``), private to the
instance and removed when it ends.

Under the operator's ``--workspace-root``:

``lower/<code key>/``        the pinned code, laid out once per (tenant, pinned ref) on this machine;
                             never reachable by runs
``runs/<tenant key>/<instance key>/``  one instance's directory, made before each of its runs (the
                             run's Landlock layer names it: a run reaches no other instance's);
                             ``tree/`` in it is the workspace
``uppers/<tenant key>/<instance key>/``  an overlay's upper and work directories (root kernels)
``owners/<instance key>``    who owns each instance directory (tenant, id), for the sweep
``spares/<code key>``        a link farm made ahead for the next workspace of that code (``links``)

Two ways to make a workspace, chosen once per kernel:

- ``overlay`` (a root kernel, where the kernel can mount one): an overlayfs over the lower tree with
  a fresh upper: true copy-on-write, ~2 ms whatever the tree's size. The root directory is made a
  shared mount first, so mounts made later reach the sandbox template's mount namespace.
- ``links`` (an ordinary user's kernel): fresh directories, each file a hard link to the lower
  tree's, read-only (runs cannot chmod), so writes are copy-on-write by replacement: tools that
  write a new file and rename it over (git, most editors and formatters) work, writing a file in
  place fails with EACCES; creating and deleting files is free. It costs one link per file, so
  one farm per laid-out code is made ahead, off the step's path, and a step's workspace is that
  spare renamed into its instance directory (then the next spare is made in the background).

The per-tenant quota counts the bytes a tenant's steps wrote (an overlay's upper; unshared files of
a link farm), checked when a step asks for a workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.kernel.model import TERMINAL
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.workspace")

TENANT_UID = 65534  # the uid a root kernel's runs use (tenant_uid.TENANT_UID)
# Where a python-wasm run sees its instance's directory (a WASI preopen): its workspace is ``tree`` in it
GUEST_DIR = "/workspace"
MAX_FILES = 100_000
SPARE_WAIT_SECONDS = 5.0  # a step waits this long at most for a spare link farm being made
MAX_BYTES = 1024 * 1024 * 1024


class QuotaExceeded(Exception):
    """The tenant's workspaces hold more than its quota: the message says how much and what to do."""


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@dataclass
class _Lower:
    """A laid-out lower tree and its listing (directories, then files), kept to link from."""

    path: Path
    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


class Workspaces:
    """The kernel's workspaces under ``root``; ``quota_bytes`` per tenant (0: no limit)."""

    def __init__(self, root: Path, quota_bytes: int = 0, mode: str = "") -> None:
        self.root = prepare_root(root, share=False)
        self.quota_bytes = quota_bytes
        self.owner = TENANT_UID if os.geteuid() == 0 else -1  # -1: runs are the kernel's own uid
        self.mode = mode or ("overlay" if self.owner >= 0 and _overlay_works(self.root) else "links")
        if self.mode == "overlay":
            prepare_root(root, share=True)
        self._lowers: dict[str, _Lower] = {}
        self._lock = threading.Lock()
        self._making: set[str] = set()  # code keys whose spare link farm a thread is making
        self._made = threading.Condition(self._lock)
        self.spares = self.mode == "links"
        if self.spares:
            _drop_orphans(self.root / "spares")
        self.first_layouts: list[float] = []  # seconds each lower tree took to lay out (for figures)

    # -- per run --------------------------------------------------------------------------------
    def instance_dir(self, tenant: str, instance: str) -> Path:
        return self.root / "runs" / _key("tenant", tenant) / _key(tenant, instance)

    def prepare(self, tenant: str, instance: str) -> str:
        """The instance's directory, made if new (before a run: the run's Landlock layer names it)."""
        path = self.instance_dir(tenant, instance)
        if not path.is_dir():
            path.parent.mkdir(mode=0o711, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
            if self.owner >= 0:
                os.chown(path, self.owner, self.owner)
            owners = self.root / "owners" / path.name
            owners.write_text(json.dumps({"tenant": tenant, "id": instance}))
        return str(path)

    # -- a workspace ----------------------------------------------------------------------------
    def workspace(
        self, tenant: str, instance: str, code: str, files: Callable[[], Iterable[WorkspaceFile]]
    ) -> str:
        """The instance's workspace of pinned ``code`` (made on first use): its path. ``files()``
        (path, bytes, executable) is read only if the code was never laid out on this machine."""
        tree = Path(self.prepare(tenant, instance)) / "tree"
        if os.path.ismount(tree) or (self.mode == "links" and tree.is_dir()):
            return str(tree)
        if self.quota_bytes and (used := self.usage(tenant)) > self.quota_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} has written {used} bytes into its workspaces, over its quota of "
                f"{self.quota_bytes} (the kernel's --workspace-quota-mb); they are freed when their instances end"
            )
        lower = self.lower(tenant, code, files)
        if self.mode == "overlay":
            self._mount(tenant, instance, lower, tree)
        elif not self._take_spare(lower, tree):
            building = tree.with_name(f"tree.{os.getpid()}.{threading.get_ident()}")
            link_farm(lower, building, self.owner)
            building.rename(tree)
        if self.spares:
            self._make_spare(lower)
        return str(tree)

    # -- spare link farms -----------------------------------------------------------------------
    def _spare(self, lower: _Lower) -> Path:
        return self.root / "spares" / lower.path.name

    def _take_spare(self, lower: _Lower, tree: Path) -> bool:
        """Rename the code's spare farm into place as ``tree``: False if there is none. A spare
        being made is waited for: making a second farm beside it takes longer on a busy disk."""
        if not self.spares:
            return False
        with self._made:
            self._made.wait_for(lambda: lower.path.name not in self._making, SPARE_WAIT_SECONDS)
        try:
            self._spare(lower).rename(tree)  # atomic: of two takers, one gets it
        except FileNotFoundError:
            return False
        return True

    def _make_spare(self, lower: _Lower) -> None:
        """Make the code's next spare farm on a thread of its own, unless one exists or is coming."""
        key = lower.path.name
        with self._lock:
            if key in self._making or self._spare(lower).is_dir():
                return
            self._making.add(key)

        def make() -> None:
            spare = self._spare(lower)
            building = spare.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}")
            try:
                link_farm(lower, building, self.owner)
                building.rename(spare)
            except OSError as exc:  # another kernel made one first, or the disk is full: made on demand
                log.debug("spare workspace for %s: %s", key, exc)
                shutil.rmtree(building, ignore_errors=True)
            finally:
                with self._made:
                    self._making.discard(key)
                    self._made.notify_all()

        threading.Thread(target=make, name="tenantflow-workspace-spare", daemon=True).start()

    def wait_spares(self, timeout: float = 30.0) -> bool:
        """Whether every spare being made is done within ``timeout`` seconds (for tests, benchmarks)."""
        with self._made:
            return self._made.wait_for(lambda: not self._making, timeout)

    def _upper(self, tenant: str, instance: str) -> Path:
        return self.root / "uppers" / _key("tenant", tenant) / _key(tenant, instance)

    def _mount(self, tenant: str, instance: str, lower: _Lower, tree: Path) -> None:
        upper = self._upper(tenant, instance)
        upper.parent.mkdir(mode=0o700, exist_ok=True)
        upper.mkdir(mode=0o700, exist_ok=True)
        (upper / "upper").mkdir(mode=0o755, exist_ok=True)
        (upper / "work").mkdir(mode=0o700, exist_ok=True)
        os.chown(upper / "upper", self.owner, self.owner)  # the tree's top, as the run sees it
        tree.mkdir(mode=0o755, exist_ok=True)
        mount_overlay(lower.path, upper / "upper", upper / "work", tree)

    def lower(self, tenant: str, code: str, files: Callable[[], Iterable[WorkspaceFile]]) -> _Lower:
        """The lower tree of (tenant, pinned ref), laid out now if this machine never did."""
        key = _key(tenant, code)
        with self._lock:
            known = self._lowers.get(key)
        if known is not None:
            return known
        path = self.root / "lower" / key
        if not path.is_dir():
            started = time.perf_counter()
            building = path.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}")
            # An overlay's files are the tenant uid's (the run writes them, copied up); a link farm's
            # stay the kernel's and read-only (shared by every workspace of this code).
            lay_out(building, files(), self.owner if self.mode == "overlay" else -1)
            try:
                building.rename(path)
            except OSError:  # another node or thread laid it out first
                shutil.rmtree(building, ignore_errors=True)
            self.first_layouts.append(time.perf_counter() - started)
        lower = listing(path)
        with self._lock:
            self._lowers[key] = lower
        return lower

    def remove(self, tenant: str, instance: str) -> None:
        """Delete an instance's directory and workspace (its instance ended)."""
        path = self.instance_dir(tenant, instance)
        tree = path / "tree"
        if os.path.ismount(tree):
            _libc().umount2(str(tree).encode(), _MNT_DETACH)
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self._upper(tenant, instance), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "owners" / path.name).unlink()

    def usage(self, tenant: str) -> int:
        """Bytes of what the tenant's steps wrote into its workspaces (an overlay's upper; a link
        farm's files that are not links to a lower tree)."""
        total = 0
        top_dir = self.root / ("uppers" if self.mode == "overlay" else "runs") / _key("tenant", tenant)
        for top, _dirs, names in os.walk(top_dir):
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(top, name))
                    if st.st_nlink == 1:
                        total += st.st_blocks * 512
        return total

    def close(self) -> None:
        """Unmount what this kernel mounted (overlays, the root's bind): nothing outlives the kernel
        in the machine's mount table. A waiting instance's overlay is mounted again from its upper
        directory when a step next asks for its workspace."""
        for target in reversed(_mount_points()):
            if target == str(self.root) or target.startswith(f"{self.root}/"):
                _libc().umount2(target.encode(), _MNT_DETACH)

    def owners(self) -> list[tuple[str, str]]:
        """(tenant, instance) of every instance directory, for the sweep of ended instances."""
        found = []
        for name in os.listdir(self.root / "owners"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads((self.root / "owners" / name).read_text())
                found.append((str(data["tenant"]), str(data["id"])))
        return found


WorkspaceFile = tuple[str, bytes, bool]  # path, content, executable
_MS_BIND, _MS_REC, _MS_SHARED, _MNT_DETACH = 0x1000, 0x4000, 1 << 20, 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = _libc()
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                  data.encode() if data else None) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, f"mount of {target} failed: {os.strerror(err)}")


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    _mount(
        "tenantflow-workspace", str(target), "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}"
    )


def _mount_points() -> list[str]:
    """Where something is mounted in this process's namespace, in mount order."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    return [line.split(" ")[1].replace("\\040", " ") for line in lines if line.count(" ") >= 2]


def prepare_root(root: Path, share: bool = True) -> Path:
    """Make the root's directories; as root (and ``share``), make it a shared mount (a bind of
    itself) so that overlays mounted under it later reach the sandbox template's mount namespace."""
    root = Path(root).resolve()
    subs = (
        ("", 0o711),
        ("lower", 0o700),
        ("runs", 0o711),
        ("uppers", 0o700),
        ("owners", 0o700),
        ("spares", 0o700),
    )
    for sub, mode in subs:
        (root / sub).mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(root / sub, mode)
    if share and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            if str(root) not in _mount_points():  # (ismount misses a bind of the same filesystem)
                _mount(str(root), str(root), None, _MS_BIND)
            _mount("none", str(root), None, _MS_SHARED)
    return root


_overlay_checked: dict[str, bool] = {}


def _overlay_works(root: Path) -> bool:
    """Whether this kernel can mount an overlay under ``root`` (tried once)."""
    if str(root) not in _overlay_checked:
        probe = Path(tempfile.mkdtemp(prefix="overlay-probe-", dir=root / "uppers"))
        try:
            for name in ("lower", "upper", "work", "tree"):
                (probe / name).mkdir()
            mount_overlay(probe / "lower", probe / "upper", probe / "work", probe / "tree")
            _libc().umount2(str(probe / "tree").encode(), _MNT_DETACH)
            _overlay_checked[str(root)] = True
        except OSError:
            _overlay_checked[str(root)] = False
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    return _overlay_checked[str(root)]


def _drop_orphans(spares: Path) -> None:
    """Remove spare farms a kernel that is gone left half made (``<key>.<pid>.<thread>``)."""
    for name in os.listdir(spares):
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(spares / name, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def lay_out(path: Path, files: Iterable[WorkspaceFile], owner: int = -1) -> None:
    """Write ``files`` under ``path``: owned by ``owner`` (>= 0) and writable by it, else read-only."""
    path.mkdir(mode=0o755)
    count = total = 0
    made: set[str] = set()
    for rel, data, executable in files:
        parts = Path(rel).parts
        if not parts or rel.startswith("/") or ".." in parts:
            continue
        count, total = count + 1, total + len(data)
        if count > MAX_FILES or total > MAX_BYTES:
            raise QuotaExceeded(f"the code holds more than {MAX_FILES} files or {MAX_BYTES} bytes")
        parent = path.joinpath(*parts[:-1])
        if str(parent) not in made:
            parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            made.add(str(parent))
        target = parent / parts[-1]
        mode = (0o755 if executable else 0o644) if owner >= 0 else (0o555 if executable else 0o444)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)  # whatever the umask
            if owner >= 0:
                os.fchown(fd, owner, owner)
        finally:
            os.close(fd)
    if owner >= 0:
        for top, _dirs, _names in os.walk(path):
            os.chown(top, owner, owner)


def listing(path: Path) -> _Lower:
    """The directories (parents first) and files of a lower tree, relative to it."""
    lower = _Lower(path)
    for top, dirs, names in os.walk(path):
        rel = os.path.relpath(top, path)
        prefix = "" if rel == "." else rel + "/"
        lower.dirs.extend(prefix + d for d in sorted(dirs))
        lower.files.extend(prefix + n for n in names)
    return lower


def link_farm(lower: _Lower, target: Path, owner: int) -> None:
    """Fresh directories under ``target`` (owned by ``owner`` if >= 0), each file a hard link to
    the lower tree's; relative paths from directory descriptors keep it to one system call a file."""
    target.mkdir(mode=0o755)
    src = os.open(lower.path, os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in lower.dirs:
            os.mkdir(d, 0o755, dir_fd=dst)
        for f in lower.files:
            os.link(f, f, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        if owner >= 0:
            os.chown(target, owner, owner)
            for d in lower.dirs:
                os.chown(d, owner, owner, dir_fd=dst, follow_symlinks=False)
    finally:
        os.close(src)
        os.close(dst)


def guest_path(path: str) -> str:
    """A workspace's path as a python-wasm run sees it (its instance directory preopened at
    :data:`GUEST_DIR`)."""
    return f"{GUEST_DIR}/{os.path.basename(path)}"


def bundle_files(files: Mapping[str, bytes]) -> list[WorkspaceFile]:
    """A code bundle's files (published artifacts) as workspace files."""
    return [(path, data, False) for path, data in files.items()]


_spaces: dict[tuple[str, int], Workspaces] = {}
_spaces_lock = threading.Lock()


def of(root: Path | None, quota_bytes: int) -> Workspaces | None:
    """The kernel's workspaces under ``root`` (one object per root; None: no workspaces)."""
    if root is None:
        return None
    with _spaces_lock:
        found = _spaces.get((str(root), quota_bytes))
        if found is None:
            found = _spaces[(str(root), quota_bytes)] = Workspaces(root, quota_bytes)
        return found


def ended(storage: Storage, tenant: str, instance: str) -> bool:
    """Whether an instance has ended (or is gone): its workspace can go."""
    record = storage.get_instance(tenant, instance)
    return record is None or record.status in TERMINAL


async def sweep_forever(spaces: Workspaces, storage: Storage, every: float = 60.0) -> None:
    """Remove the workspaces of instances that ended without a run of their own noticing
    (terminated, deleted, ended on another node)."""
    while True:
        await asyncio.sleep(every)
        for tenant, instance in await asyncio.to_thread(spaces.owners):
            try:
                if await asyncio.to_thread(ended, storage, tenant, instance):
                    await asyncio.to_thread(spaces.remove, tenant, instance)
            except Exception as exc:  # a storage hiccup: the next sweep tries again
                log.warning("workspace sweep: %s", exc)
