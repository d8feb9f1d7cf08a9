"""The one place that calls pluggy hooks: loads plugins and returns typed answers."""

from __future__ import annotations

import pluggy

from tenantflow.kernel import hookspecs
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.loader import Loader
from tenantflow.kernel.sandbox import Sandbox
from tenantflow.kernel.storage import Storage


class Plugins:
    """Built-in and third-party plugins, all found through the ``tenantflow`` entry-point group."""

    def __init__(self, extra: list[object] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        for plugin in extra or []:
            self.pm.register(plugin)

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def storage(self, url: str, config: KernelConfig) -> Storage:
        storage: Storage | None = self.pm.hook.tenantflow_storage(url=url, config=config)
        if storage is None:
            raise InvalidArgument(f"no installed storage plugin handles {url!r} (installed: {self.names()})")
        return storage

    def sandboxes(self, config: KernelConfig) -> dict[str, Sandbox]:
        found: dict[str, Sandbox] = {}
        for batch in self.pm.hook.tenantflow_sandboxes(config=config):
            for sandbox in batch:
                found.setdefault(sandbox.runtime, sandbox)
        return found

    def loaders(self, storage: Storage, config: KernelConfig) -> dict[str, Loader]:
        found: dict[str, Loader] = {}
        for batch in self.pm.hook.tenantflow_loaders(storage=storage, config=config):
            for loader in batch:
                for scheme in loader.schemes:
                    found.setdefault(scheme, loader)
        return found
