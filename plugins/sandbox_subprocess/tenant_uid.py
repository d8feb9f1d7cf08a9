"""The uid tenant code runs as, and the file view that lets it reach what it must.

A kernel running as root never runs tenant code as uid 0 (without capabilities uid 0 still owns
every root-owned file its Landlock rules reach): the template switches to ``TENANT_UID`` (nobody).
That uid must traverse to the interpreter, its packages and the operator's grants, which may lie
under a directory closed to others (``/root`` is 0700: a pyenv Python, a venv under a home, a
grant under pytest's ``/tmp/pytest-of-root``). So the template, still privileged, takes a private
mount namespace and covers each such directory with an empty tmpfs of mode 0755, binding back only
the paths it needs at their own place: paths stay identical, and nothing else under the covered
directory is visible. A kernel running as an ordinary user runs tenant code as that user (its
files are its own; Landlock narrows them) and needs none of this.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

from tenantflow.plugins.sandboxing.linux import libc, without_effective_capabilities

TENANT_UID = TENANT_GID = 65534  # nobody / nogroup
CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_SLAVE = 0x1000, 0x4000, 1 << 19


def _traversable(mode: int) -> bool:
    return bool(mode & stat.S_IXOTH)


def closed_ancestors(paths: list[str]) -> list[str]:
    """The topmost strict ancestors of ``paths`` that other users cannot traverse."""
    closed: set[str] = set()
    for path in paths:
        parents = list(reversed(Path(path).parents))  # from "/" down
        for parent in parents:
            try:
                mode = parent.stat().st_mode
            except OSError:
                break
            if not _traversable(mode):
                closed.add(str(parent))
                break
    return sorted(p for p in closed if not any(Path(p).is_relative_to(o) and p != o for o in closed))


def _bytes(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount of {target} failed: {os.strerror(err)}")


def open_view(paths: list[str]) -> str:
    """Make every path in ``paths`` reachable by other users in a private mount namespace of
    this process (privileged: the template before it drops); a problem, or ""."""
    wanted = sorted({str(Path(p)) for p in paths if os.path.exists(p)})
    closed = closed_ancestors(wanted)
    if not closed:
        return ""
    if libc.unshare(ctypes.c_int(CLONE_NEWNS)) != 0:
        return f"no private mount namespace could be made (errno {ctypes.get_errno()})"
    try:
        _mount(None, "/", None, _MS_REC | _MS_SLAVE)  # nothing mounted here reaches the host
        for cover in closed:
            inside = [p for p in wanted if Path(p).is_relative_to(cover) and p != cover]
            keep = [p for p in inside if not any(Path(p).is_relative_to(q) and p != q for q in inside)]
            sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in keep}
            try:
                _mount("tenantflow", cover, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0755,size=1m")
                for path, fd in sources.items():
                    os.makedirs(path, mode=0o755, exist_ok=True)
                    _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
            finally:
                for fd in sources.values():
                    os.close(fd)
    except OSError as exc:
        return str(exc)
    return ""


def unreachable_as_tenant(paths: list[str]) -> list[str]:
    """Those of ``paths`` that ``TENANT_UID`` could not read (and list, for a directory), checked
    as it by this root process, which stays root."""
    missing = []
    os.setegid(TENANT_GID)
    os.seteuid(TENANT_UID)
    try:
        with without_effective_capabilities():
            for path in paths:
                need = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
                if os.path.exists(path) and not os.access(path, need, effective_ids=True):
                    missing.append(path)
    finally:
        os.seteuid(0)
        os.setegid(0)
    return missing


def unusable_grants(writable: list[str]) -> list[str]:
    """A sentence for each granted directory this process (as tenant code's uid) cannot use, naming
    its owner and mode and what to set; an operator's files are never changed for them."""
    problems = []
    uid = os.getuid()
    with without_effective_capabilities():
        usable = [p for p in writable if os.access(p, os.R_OK | os.W_OK | os.X_OK)]
    for path in writable:
        if path in usable:
            continue
        try:
            info = os.stat(path)
            what = f"owner {info.st_uid}:{info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}"
        except OSError as exc:
            what = f"not reachable: {exc.strerror}"
        problems.append(
            f"{path} ({what}) is not readable and writable by uid {uid}, the uid tenant code runs as: "
            f"`chown {uid} {path}` (or `chmod 0777 {path}`, or an ACL giving uid {uid} rwx)"
        )
    return problems


def drop() -> str:
    """Switch this (root) process to ``TENANT_UID``; a problem, or ""."""
    try:
        os.setgroups([])
        os.setgid(TENANT_GID)
        os.setuid(TENANT_UID)
    except OSError as exc:
        return f"could not switch to uid {TENANT_UID} ({exc})"
    return ""
