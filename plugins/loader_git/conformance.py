"""The loader suite's harness for ``git+file``: a bare repository per tenant under the kernel's
``--git-root``, built with pygit2 (no git CLI, no network)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grpc
import pygit2
from pygit2.enums import FileMode

from tenantflow.client import Client
from tenantflow.conformance.harness import LoaderHarness, LoaderSource

NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
_SIG = pygit2.Signature("tenantflow tests", "tests@tenantflow.invalid")


class GitRepo:
    """A bare repository; each :meth:`commit` replaces the branch's whole tree with ``files``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repo = pygit2.init_repository(str(path), bare=True, initial_head="main")

    def commit(self, files: dict[str, str | bytes], branch: str = "main", message: str = "change") -> str:
        """Commit ``files`` (inline sources are dedented) on ``branch``; return the commit sha."""
        index = pygit2.Index()
        for name, text in files.items():
            data = text if isinstance(text, bytes) else textwrap.dedent(text).lstrip().encode()
            index.add(pygit2.IndexEntry(name, self.repo.create_blob(data), FileMode.BLOB))
        tree = index.write_tree(self.repo)
        ref = self.repo.references.get(f"refs/heads/{branch}")
        parents = [ref.target] if ref is not None else []
        return str(self.repo.create_commit(f"refs/heads/{branch}", _SIG, _SIG, message, tree, parents))

    def tag(self, name: str, sha: str) -> None:
        """An annotated tag (peeled to its commit by the loader)."""
        self.repo.create_tag(name, pygit2.Oid(hex=sha), pygit2.enums.ObjectType.COMMIT, _SIG, name)

    def ref(self, rev: str = "main", path: str = "wf.py") -> str:
        """The ``git+file://`` ref of ``path`` at ``rev``."""
        return f"git+file://{self.path}@{rev}#{path}"


class GitSource(LoaderSource):
    """A tenant's repository; a release is a new commit on ``main``."""

    def __init__(self, tenant: str, root: Path) -> None:
        self.repo = GitRepo(root / f"{tenant}.git")
        self.repo.commit({"wf.py": "def broken(:\n"}, branch="broken")
        super().__init__(tenant, bad=[
            (f"git+file://{root}/missing.git@main#wf.py", NOT_FOUND, "no git repository"),
            (self.repo.ref("nope"), NOT_FOUND, "no branch, tag or commit 'nope'"),
            (self.repo.ref("f" * 40), NOT_FOUND, f"commit {'f' * 40!r}"),
            (self.repo.ref("main", "missing.py"), NOT_FOUND, "no file 'missing.py'"),
            (self.repo.ref("broken"), INVALID, "wf.py, line 1"),
            ("git+file:///etc/repo.git@main#wf.py", INVALID, "not under a git root"),
            (f"git+file://{self.repo.path}#wf.py", INVALID, "no '@<branch|tag|commit>'"),
            (f"git+file://{self.repo.path}@main", INVALID, "no module path"),
        ])  # fmt: skip

    def release(self, client: Client, code: str) -> str:
        self.repo.commit({"wf.py": code})
        return self.repo.ref("main")

    def pinned(self) -> re.Pattern[str]:
        return re.compile(rf"^git\+file://{re.escape(str(self.repo.path))}@[0-9a-f]{{40}}#wf\.py$")


@dataclass
class GitHarness(LoaderHarness):
    """The kernel reads repositories under ``root`` (its ``--git-root``)."""

    name: str = "git+file"

    def kernel_args(self, root: Path) -> list[str]:
        return ["--git-root", str(root)]

    def source(self, tenant: str, root: Path) -> LoaderSource:
        return GitSource(tenant, root)
