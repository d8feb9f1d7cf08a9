"""The git loader: resolve a branch, tag or commit to a commit sha, and read a module's files from it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pygit2
from pygit2.enums import ObjectType, RepositoryOpenFlag

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, NotFound, ResourceExhausted
from tenantflow.kernel.loader import CodeBundle
from tenantflow.plugins.loader_git import confine, roots
from tenantflow.plugins.loader_git.mirror import Mirrors
from tenantflow.plugins.loader_git.ref import SCHEMES, GitRef, parse

MAX_FILES = 2000
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
_LINK = 0o120000
_EXECUTABLE = 0o100755


class GitLoader:
    """Loads tenant code from git repositories under the operator's allowed roots."""

    schemes: tuple[str, ...] = SCHEMES

    def __init__(self, config: KernelConfig) -> None:
        self._config = config
        self._mirrors = Mirrors(config.data_dir / "git-mirrors")

    def pin(self, tenant: str, ref: str) -> str:
        git = parse(ref)
        with self._open(tenant, git, fetch=not git.pinned) as repo:
            commit = _resolve(repo, git)
            _blob(commit, git)
            return str(git.at(str(commit.id)))

    def load(self, tenant: str, pinned: str) -> CodeBundle:
        git = parse(pinned)
        if not git.pinned:
            raise InvalidArgument(f"{pinned!r} is not pinned to a 40-hex commit sha")
        with self._open(tenant, git, fetch=False) as repo:
            commit = _resolve(repo, git)
            _blob(commit, git)
            files = dict(_module_files(commit, git, self._config.max_code_bytes))
        return CodeBundle(ref=pinned, runtime=git.runtime, files=files, entry=git.entry)

    def workspace_files(self, tenant: str, pinned: str) -> list[tuple[str, bytes, bool]]:
        """The commit's whole tree for a workspace (``ctx.workspace()``): every regular file, with
        whether it is executable (symbolic links and submodules are left out)."""
        git = parse(pinned)
        if not git.pinned:
            raise InvalidArgument(f"{pinned!r} is not pinned to a 40-hex commit sha")
        with self._open(tenant, git, fetch=False) as repo:
            commit = _resolve(repo, git)
            return [
                (path, blob.data, blob.filemode == _EXECUTABLE)
                for path, blob in _walk(commit.tree, "", any_file=True)
            ]

    def _open(self, tenant: str, git: GitRef, fetch: bool) -> _Repo:
        if git.scheme == "git+file":
            real = roots.check_file(self._config.git_roots, tenant, git.location)
            return _Repo(real, git.location, self._config.git_roots, tenant)
        roots.check_url(self._config.git_roots, tenant, git.url)
        path = self._mirrors.sync(git.url, None if fetch else git.rev)
        return _Repo(str(path), git.url, [str(path)], tenant)


class _Repo:
    """A repository opened for one call (libgit2 handles are not shared across threads) and freed after."""

    def __init__(self, real: str, shown: str, allowed: list[str], tenant: str) -> None:
        try:
            self.repo = pygit2.Repository(real, RepositoryOpenFlag.NO_SEARCH)
        except pygit2.GitError:
            raise NotFound(f"no git repository at {shown!r}") from None
        gitdir = os.path.realpath(self.repo.path)
        allowed_dirs = roots.file_roots(allowed, tenant)
        try:
            if not any(roots.within(gitdir, root) for root in allowed_dirs):
                raise InvalidArgument(f"repository {shown!r} keeps its objects outside the allowed git roots")
            confine.check_gitdir(gitdir, allowed_dirs, shown)
            self.repo.set_odb(confine.confined_odb(gitdir, allowed_dirs, shown))
        except BaseException:
            self.repo.free()
            raise
        self.shown = shown

    def __enter__(self) -> _Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.repo.free()


def _resolve(r: _Repo, git: GitRef) -> pygit2.Commit:
    """The commit a branch, tag, HEAD or (abbreviated) sha names."""
    repo = r.repo
    target: pygit2.Object | pygit2.Commit | None = None
    if git.rev == "HEAD":
        target = None if repo.head_is_unborn else repo.head.peel(pygit2.Commit)
    if target is None and not git.pinned:
        for name in (f"refs/heads/{git.rev}", f"refs/tags/{git.rev}"):
            reference = repo.references.get(name)
            if reference is not None:
                try:
                    target = reference.peel(pygit2.Commit)
                except (KeyError, ValueError, pygit2.GitError):
                    raise NotFound(
                        f"{name} in git repository {r.shown!r} names a commit it does not hold"
                    ) from None
                break
    if target is None and _HEX.match(git.rev):
        try:
            target = repo.revparse_single(git.rev)
        except (KeyError, ValueError, pygit2.GitError):
            target = None
    if target is None:
        raise NotFound(f"no branch, tag or commit {git.rev!r} in git repository {r.shown!r}")
    try:
        commit = target.peel(pygit2.Commit)
    except (ValueError, pygit2.GitError):
        raise InvalidArgument(f"{git.rev!r} in {r.shown!r} does not name a commit") from None
    assert isinstance(commit, pygit2.Commit)
    return commit


def _blob(commit: pygit2.Commit, git: GitRef) -> None:
    """Check the module exists at the commit."""
    try:
        obj = commit.tree[git.path]
    except KeyError:
        raise NotFound(f"no file {git.path!r} at commit {commit.id} of {git.url!r}") from None
    if obj.type != ObjectType.BLOB or obj.filemode == _LINK:
        raise InvalidArgument(f"{git.path!r} at commit {commit.id} of {git.url!r} is not a regular file")


def _module_files(commit: pygit2.Commit, git: GitRef, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """The ``.py`` files of the module's directory tree, relative to that directory (like a script's
    ``sys.path[0]``): siblings import as top-level modules, subdirectories as packages."""
    tree = commit.tree if not git.module_dir else commit.tree[git.module_dir]
    assert isinstance(tree, pygit2.Tree)
    count = total = 0
    for path, blob in _walk(tree, ""):
        count += 1
        total += len(path) + blob.size
        if count > MAX_FILES or total > max_bytes:
            raise ResourceExhausted(
                f"{git.module_dir or 'the top level'} of {git.url!r} holds more than {MAX_FILES} .py files or "
                f"{max_bytes} bytes of them: keep the workflow in a smaller directory"
            )
        yield path, blob.data


def _walk(tree: pygit2.Tree, prefix: str, any_file: bool = False) -> Iterator[tuple[str, pygit2.Blob]]:
    for obj in tree:
        name = obj.name or ""
        if isinstance(obj, pygit2.Tree):
            yield from _walk(obj, f"{prefix}{name}/", any_file)
        elif isinstance(obj, pygit2.Blob) and (any_file or name.endswith(".py")) and obj.filemode != _LINK:
            yield f"{prefix}{name}", obj
