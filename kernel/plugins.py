"""The one place that calls pluggy hooks: loads plugins and returns typed answers.

Plugins are the ``tenantflow`` entry points, loaded one by one. One whose dependencies are not
installed is left out and remembered with the extra that provides it, so asking for what only it
would handle tells what to install, not only that nothing handles it. That extra is the one the
entry point names (``name = "module [extra]"``, where the packaging tool allows it) or else the
distribution's extra of the entry point's own name (``fdb = "tenantflow.plugins.storage_fdb"`` and
``tenantflow[fdb]``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from tenantflow.kernel import contracts, hookspecs
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.loader import Loader
from tenantflow.kernel.sandbox import Sandbox
from tenantflow.kernel.storage import Storage

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness

log = logging.getLogger("tenantflow.kernel")


@dataclass(frozen=True)
class Unloaded:
    """A plugin left out because an import it needs failed."""

    name: str  # the entry point's name
    error: str  # e.g. "No module named 'fdb'"
    dist: str  # the distribution that declares the entry point
    extras: tuple[str, ...]  # the extras that provide what it needs, e.g. ("fdb",)
    words: frozenset[str]  # its name, the missing module, the extras and what they install

    def advice(self) -> str:
        fix = f": pip install '{self.dist}[{','.join(self.extras)}]'" if self.extras else ""
        return f"the {self.name} plugin could not load ({self.error}){fix}"


def _load(ep: importlib.metadata.EntryPoint) -> object | Unloaded:
    """The plugin ``ep`` names, or why it could not be imported. A missing third-party module
    (an extra not installed) is an answer; a broken import of our own modules is raised."""
    try:
        plugin: object = ep.load()
        return plugin
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "tenantflow":
            raise
        dist = ep.dist
        offered = (dist.metadata.get_all("Provides-Extra") or []) if dist is not None else []
        extras = tuple(ep.extras) or ((ep.name,) if ep.name in offered else ())
        words = {ep.name, (exc.name or "").split(".")[0], *extras}
        for requirement in (dist.requires or []) if dist is not None else []:
            name, _, marker = requirement.partition(";")
            if any(re.search(rf"extra\s*==\s*['\"]{re.escape(e)}['\"]", marker) for e in extras):
                words.add(re.split(r"[^A-Za-z0-9._-]", name.strip(), maxsplit=1)[0].lower())
        return Unloaded(
            ep.name, str(exc), dist.name if dist else "tenantflow", extras, frozenset(words) - {""}
        )


class Plugins:
    """Built-in and third-party plugins, all found through the ``tenantflow`` entry-point group."""

    def __init__(self, extra: list[object] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.unloaded: dict[str, Unloaded] = {}
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if (
                self.pm.get_plugin(ep.name) is not None
                or self.pm.is_blocked(ep.name)
                or ep.name in self.unloaded
            ):
                continue  # as pluggy's own loader: the first of a name wins
            plugin = _load(ep)
            if isinstance(plugin, Unloaded):
                self.unloaded[ep.name] = plugin
                # An extra not installed is a choice; a plugin that names none is missing something.
                log.log(logging.INFO if plugin.extras else logging.WARNING, "not loaded: %s", plugin.advice())
            else:
                self.pm.register(plugin, name=ep.name)
        for plugin in extra or []:
            self.pm.register(plugin)
        contracts.check(self.pm)  # refuse, at start, plugins made for other contract versions

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def unavailable(self, wanted: str) -> str:
        """Why nothing may handle ``wanted`` (a runtime, or a storage URL's or code ref's scheme):
        ``""`` when every plugin loaded, else ``"; the <name> plugin could not load (...): pip
        install '...'"`` for the plugins whose name, missing module, extra or a package that extra
        installs appears in ``wanted`` (``kv+lmdb`` names lmdb, of ``tenantflow[fdb]``), or for
        all of them when none does."""
        words = set(re.split(r"[^a-z0-9_]+", wanted.lower()))
        likely = [u for u in self.unloaded.values() if words & u.words]
        return "".join(f"; {u.advice()}" for u in likely or self.unloaded.values())

    def storage(self, url: str, config: KernelConfig) -> Storage:
        storage: Storage | None = self.pm.hook.tenantflow_storage(url=url, config=config)
        if storage is None:
            raise InvalidArgument(
                f"no installed storage plugin handles {url!r} (installed: {self.names()})"
                + self.unavailable(url.partition(":")[0])
            )
        return storage

    def sandboxes(self, config: KernelConfig) -> dict[str, Sandbox]:
        found: dict[str, Sandbox] = {}
        for batch in self.pm.hook.tenantflow_sandboxes(config=config):
            for sandbox in batch:
                found.setdefault(sandbox.runtime, sandbox)
        return found

    def conformance(self, kind: str, name: str) -> Harness | None:
        """The conformance suites' harness a plugin gives for ``kind`` ``name`` (tests only)."""
        found: Harness | None = self.pm.hook.tenantflow_conformance(kind=kind, name=name)
        return found

    def loaders(self, storage: Storage, config: KernelConfig) -> dict[str, Loader]:
        found: dict[str, Loader] = {}
        for batch in self.pm.hook.tenantflow_loaders(storage=storage, config=config):
            for loader in batch:
                for scheme in loader.schemes:
                    found.setdefault(scheme, loader)
        return found
