"""Every object a git ref reads comes from under the tenant's own roots.

A repository directory a tenant can write to could otherwise borrow another tenant's objects
(``objects/info/alternates``, absolute or relative; ``http-alternates``), whole repository
(``commondir``) or object store (a symlink in ``objects/``), and run or read that tenant's code.
So the loader never lets libgit2 find objects by itself: :func:`confined_odb` builds the object
database from the repository's own ``objects`` directory and the alternates that resolve inside
the roots, refusing anything that points elsewhere with a message naming it. Refs are read as
libgit2 reads them (a ref that names a borrowed commit then finds no object); ``commondir`` is
refused outright, since it would also serve another repository's refs.
"""

from __future__ import annotations

import os

import pygit2

from tenantflow.kernel.errors import InvalidArgument
from tenantflow.plugins.loader_git.roots import within

MAX_ALTERNATE_DEPTH = 5  # as git and libgit2
_PACKED, _LOOSE = 2, 1  # libgit2's priorities: packs first


def _inside(path: str, allowed: list[str]) -> bool:
    return any(within(path, root) for root in allowed)


def _refuse(shown: str, what: str, target: str) -> InvalidArgument:
    return InvalidArgument(
        f"repository {shown!r} borrows objects through {what}, which points outside your git root "
        f"({target}): a repository must keep every object and ref under its tenant's own root"
    )


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.strip() for line in handle.read(64 * 1024).splitlines() if line.strip()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None


def check_gitdir(gitdir: str, allowed: list[str], shown: str) -> None:
    """Refuse a git directory that shares another repository's (``commondir``)."""
    for line in _lines(os.path.join(gitdir, "commondir"))[:1]:
        target = os.path.realpath(os.path.join(gitdir, line))
        if not _inside(target, allowed):
            raise _refuse(shown, "commondir", target)


def _check_symlinks(objects: str, allowed: list[str], shown: str) -> None:
    """Refuse symlinks in the object store (fan-out directories, loose objects, packs) that leave
    the roots. Directory entries come typed from scandir, so only links cost a resolve."""
    pending = [objects]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not _inside(target, allowed):
                        raise _refuse(shown, f"the symlink {os.path.relpath(entry.path, objects)}", target)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)


def _object_dirs(objects: str, allowed: list[str], shown: str, depth: int = 0) -> list[str]:
    """``objects`` and, recursively, its alternates: all resolved and inside the roots."""
    real = os.path.realpath(objects)
    if not _inside(real, allowed):
        raise _refuse(shown, "its objects directory" if depth == 0 else "alternates", real)
    if not os.path.isdir(real):
        raise InvalidArgument(f"repository {shown!r} has no objects directory")
    if _lines(os.path.join(real, "info", "http-alternates")):
        raise _refuse(shown, "objects/info/http-alternates", "a URL or path git would fetch from")
    _check_symlinks(real, allowed, shown)
    found = [real]
    for line in _lines(os.path.join(real, "info", "alternates")):
        if line.startswith("#"):
            continue
        target = os.path.realpath(os.path.join(real, line))
        if not _inside(target, allowed):
            raise _refuse(shown, "objects/info/alternates", target)
        if depth + 1 > MAX_ALTERNATE_DEPTH:
            raise InvalidArgument(f"repository {shown!r}: alternates nest deeper than {MAX_ALTERNATE_DEPTH}")
        found += [d for d in _object_dirs(target, allowed, shown, depth + 1) if d not in found]
    return found


def confined_odb(gitdir: str, allowed: list[str], shown: str) -> pygit2.Odb:
    """The repository's object database: its own objects and in-root alternates, nothing else."""
    odb = pygit2.Odb()
    for rank, directory in enumerate(reversed(_object_dirs(os.path.join(gitdir, "objects"), allowed, shown))):
        odb.add_backend(pygit2.OdbBackendPack(directory), 10 * rank + _PACKED)
        odb.add_backend(pygit2.OdbBackendLoose(directory, -1, False), 10 * rank + _LOOSE)
    return odb
