"""Which repositories a tenant may name: the operator's ``--git-root`` directories and URL prefixes."""

from __future__ import annotations

import os

from tenantflow.kernel.errors import InvalidArgument

HINT = "the kernel operator allows them with `tenantflow serve --git-root DIR|https://PREFIX` (KernelConfig.git_roots)"


def _expand(root: str, tenant: str) -> str:
    return root.replace("{tenant}", tenant)


def within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def file_roots(roots: list[str], tenant: str) -> list[str]:
    """The resolved directories ``tenant`` may read repositories from."""
    return [os.path.realpath(_expand(r, tenant)) for r in roots if not r.startswith(("https://", "http://"))]


def check_file(roots: list[str], tenant: str, repo: str) -> str:
    """Resolve ``repo`` (symlinks and all) and check it lies under a root; return the resolved path."""
    allowed = file_roots(roots, tenant)
    if not allowed:
        raise InvalidArgument(f"git+file refs are disabled on this kernel: {HINT}")
    real = os.path.realpath(repo)
    if not any(within(real, root) for root in allowed):
        raise InvalidArgument(
            f"repository {repo!r} is not under a git root allowed for tenant {tenant!r}: {HINT}"
        )
    return real


def check_url(roots: list[str], tenant: str, url: str) -> None:
    """Check an https repository URL starts with an allowed prefix (at a '/' boundary)."""
    prefixes = [_expand(r, tenant) for r in roots if r.startswith("https://")]
    if not prefixes:
        raise InvalidArgument(f"git+https refs are disabled on this kernel: {HINT}")
    if not any(within(url, p) for p in prefixes):
        raise InvalidArgument(
            f"repository {url!r} is not under a git root allowed for tenant {tenant!r}: {HINT}"
        )
