"""Real git repositories for tests, built with pygit2 (no git CLI, no network)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pygit2
from pygit2.enums import FileMode

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
        return f"git+file://{self.path}@{rev}#{path}"


def workflow(output: str, sleep: float = 0.0, cls: str = "Flow") -> str:
    """A workflow module that optionally sleeps, then returns ``output``."""
    nap = f'        await step.sleep("nap", {sleep})\n' if sleep else ""
    return (
        "from tenantflow.workflow import WorkflowEntrypoint\n\n\n"
        f"class {cls}(WorkflowEntrypoint):\n"
        "    async def run(self, event, step):\n"
        f"{nap}"
        f'        return await step.do("out", lambda: {output!r})\n'
    )
