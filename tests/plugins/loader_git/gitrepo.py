"""Real git repositories for tests, built with pygit2 (no git CLI, no network): the loader
suite's :class:`GitRepo`, and a workflow module to commit."""

from __future__ import annotations

from tenantflow.plugins.loader_git.conformance import GitRepo

__all__ = ["GitRepo", "workflow"]


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
