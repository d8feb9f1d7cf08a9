"""Contract versions: each plugin contract carries one, each plugin declares the versions it
supports, and a kernel refuses to start with a plugin that does not support its own.

A plugin declares them in ``TENANTFLOW_CONTRACTS``, a module (or plugin object) attribute mapping
``hookspecs`` and each contract whose hook it implements (``storage``, ``sandbox``, ``loader``) to
the versions it supports: ``TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [1]}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pluggy

from tenantflow.kernel import hookspecs, loader, sandbox, storage

DECLARATION = "TENANTFLOW_CONTRACTS"
CONTRACTS: dict[str, int] = {
    "hookspecs": hookspecs.CONTRACT_VERSION,
    "storage": storage.CONTRACT_VERSION,
    "sandbox": sandbox.CONTRACT_VERSION,
    "loader": loader.CONTRACT_VERSION,
}
# The contract a plugin takes on by implementing a hook (every plugin takes on the hookspecs).
HOOK_CONTRACTS = {
    "tenantflow_storage": "storage",
    "tenantflow_sandboxes": "sandbox",
    "tenantflow_loaders": "loader",
}


class ContractMismatch(ValueError):
    """A plugin does not support this kernel's version of a contract it implements (or declares
    none); the message names the plugin, the versions it supports and the kernel's."""


def _versions(value: object) -> frozenset[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset({value})
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        items = list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return frozenset(items)
    return None


def problems(name: str, plugin: object, hooks: Iterable[str]) -> list[str]:
    """What keeps ``plugin`` (implementing ``hooks``) from running on this kernel, one line each."""
    needed = ["hookspecs", *sorted({HOOK_CONTRACTS[h] for h in hooks if h in HOOK_CONTRACTS})]
    wanted = ", ".join(f"{c!r}: [{CONTRACTS[c]}]" for c in needed)
    declared = getattr(plugin, DECLARATION, None)
    if not isinstance(declared, Mapping):
        return [f"the {name} plugin declares no contract versions: add {DECLARATION} = {{{wanted}}}"]
    found = []
    for contract in needed:
        versions = _versions(declared.get(contract))
        if versions is None:
            found.append(
                f"the {name} plugin declares no {contract} contract version in {DECLARATION} "
                f"(this kernel has {contract} {CONTRACTS[contract]})"
            )
        elif CONTRACTS[contract] not in versions:
            supported = ", ".join(str(v) for v in sorted(versions)) or "none"
            found.append(
                f"the {name} plugin supports {contract} contract {supported}; this kernel has "
                f"{contract} {CONTRACTS[contract]}: install a version of the plugin (or of "
                "tenantflow) made for it"
            )
    return found


def check(pm: pluggy.PluginManager) -> None:
    """Raise :class:`ContractMismatch` naming every registered plugin whose versions do not meet."""
    found: list[str] = []
    for name, plugin in pm.list_name_plugin():
        if name.isdigit():  # registered without a name: call it by its class
            name = type(plugin).__qualname__
        hooks = [caller.name for caller in pm.get_hookcallers(plugin) or []]
        found += problems(name, plugin, hooks)
    if found:
        raise ContractMismatch("; ".join(found))
