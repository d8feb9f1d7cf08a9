"""Local bare mirrors of remote (git+https) repositories, fetched when a ref needs resolving."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pygit2

from tenantflow.kernel.errors import NotFound, Unavailable

_REFSPECS = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]


class Mirrors:
    """One bare mirror per remote URL under ``root``; a fetch at a time per URL."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def sync(self, url: str, want: str | None) -> Path:
        """The mirror of ``url``, fetched first unless it already has commit ``want``."""
        path = self._root / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".git")
        with self._guard:
            lock = self._locks.setdefault(url, threading.Lock())
        with lock:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                repo = pygit2.init_repository(str(path), bare=True)
                repo.remotes.create("origin", url, _REFSPECS[0])
                repo.remotes.add_fetch("origin", _REFSPECS[1])
            else:
                repo = pygit2.Repository(str(path))
            try:
                if want is None or want not in repo:
                    repo.remotes["origin"].fetch(prune=pygit2.enums.FetchPrune.PRUNE)
            except pygit2.GitError as exc:
                message = str(exc)
                if "404" in message or "not found" in message.lower():
                    raise NotFound(f"no git repository at {url!r}: {message}") from None
                raise Unavailable(f"cannot fetch {url!r}: {message}") from None
            finally:
                repo.free()
        return path
