"""Git loader plugin: tenant workflow code straight from git repositories.

Refs: ``git+file:///path/to/repo.git@<branch|tag|commit>#<path/to/module.py>`` and
``git+https://host/path.git@<rev>#<path>``, optionally ``?runtime=<name>`` before the ``#`` (default
``python``). ``Create`` resolves the rev to a full commit sha and stores the pinned ref
(``...@<40 hex>#path``) in the envelope, so an instance runs that commit for life: later commits to
the branch reach only instances created afterwards, and ``Restart`` reruns the pinned commit too. A
platform moves a tenant to new code by creating new instances from the branch (or the new sha) and,
if it wants, terminating the old ones; running instances never switch code mid-flight.

The bundle is the module's directory tree, ``.py`` files only (at most 2,000 files and
``max_code_bytes``), keyed relative to that directory: like ``python path/to/module.py``, sibling
modules import as top-level modules. Only classes of the named module count as workflows.

Security: the refs read the kernel machine's disk (and network), so the operator names what tenants
may reach with ``tenantflow serve --git-root DIR|https://PREFIX`` (``KernelConfig.git_roots``;
none by default, which refuses every git ref). A root is shared by all tenants unless it contains
``{tenant}``, which stands for the calling tenant (``--git-root /srv/git/{tenant}``). Paths are
resolved through symlinks before the check; a repository whose git directory lies outside the roots
is refused, and objects are read only from the repository's own store and alternates under the
tenant's roots (see :mod:`.confine`). Remote repositories are mirrored under ``<data-dir>/git-mirrors`` and fetched when a
branch or tag is pinned (or a pinned commit is missing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.loader import Loader
from tenantflow.kernel.storage import Storage
from tenantflow.plugins.loader_git.loader import GitLoader

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [1]}  # the versions this plugin supports


@hookimpl
def tenantflow_loaders(storage: Storage, config: KernelConfig) -> list[Loader]:
    return [GitLoader(config)]


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if (kind, name) != ("loader", "git+file"):
        return None
    from tenantflow.plugins.loader_git.conformance import GitHarness

    return GitHarness()
