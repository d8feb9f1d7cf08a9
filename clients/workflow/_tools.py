"""What a step callback may reach beyond its arguments: ``ctx.kv``, the tenant's own key-value
store, and ``ctx.secrets``, the tenant's secrets. Both work only while the attempt that got them
runs; the kernel answers their reads only for an attempt in flight.

Writes are buffered here and sent with the attempt's result, and the kernel commits them in the
transaction that records the step complete: a failed, timed-out or crashed attempt leaves nothing,
and a replayed step (its callback not called again) writes nothing again. Reads see what is
committed plus this attempt's own writes.

Protocol (see ``_protocol``): ``{"op": "kv", "key", "attempt", "get": k}`` -> ``{"value_json"}``
(None: absent); ``{"op": "kv", "key", "attempt", "list": prefix, "after", "limit"}`` ->
``{"entries": [[k, value_json], ...], "next"}``; ``{"op": "secret", "key", "attempt", "name"}`` ->
``{"value"}`` or ``{"missing"}``; any of them -> ``{"error"}`` when the kernel refuses. The result
carries ``"kv": [[k, value_json or None], ...]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

MAX_KEY_BYTES = 512
DEFAULT_LIMITS = {"max_value_bytes": 64 * 1024, "max_writes": 1000, "max_list": 1000}
Ask = Callable[[dict[str, Any]], dict[str, Any]]


class KVPage(NamedTuple):
    """A page of ``ctx.kv.list``: ``items`` as (key, value) pairs in key order, and the ``cursor``
    of the next page (None on the last)."""

    items: list[tuple[str, Any]]
    cursor: str | None


class _Attempt:
    """One attempt's reach: its step key and number, its buffered writes, whether it still runs."""

    def __init__(self, key: str, attempt: int, ask: Ask, limits: dict[str, int]) -> None:
        self.key, self.attempt, self.ask, self.limits = key, attempt, ask, limits
        self.writes: dict[str, str | None] = {}
        self.open = True

    def request(self, what: str, **fields: Any) -> dict[str, Any]:
        if not self.open:
            raise RuntimeError(
                f"ctx.{what} of step {self.key.rpartition('#')[0]!r} (attempt {self.attempt}) was used after "
                "its callback returned: ctx.kv and ctx.secrets work only inside the running step callback"
            )
        reply = self.ask(
            {"op": "kv" if what == "kv" else "secret", "key": self.key, "attempt": self.attempt, **fields}
        )
        if "error" in reply:
            raise RuntimeError(str(reply["error"]))
        return reply


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a key must be a string, got {type(key).__name__}")
    size = len(key.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_KEY_BYTES:
        raise ValueError(f"a key must be 1-{MAX_KEY_BYTES} bytes of UTF-8, got {size}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("a key must not contain control characters")
    return key


class KV:
    """``ctx.kv``: the tenant's own durable key-value store (JSON values), shared by all its
    instances. Writes commit with the step's result, or not at all, and only if every key this
    attempt read is unchanged by then (the kernel keeps what each read saw); else the callback runs
    again with fresh reads, so a read-modify-write loses no update."""

    def __init__(self, attempt: _Attempt) -> None:
        self._a = attempt

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (this attempt's own writes included), else ``default``."""
        _check_key(key)
        if key in self._a.writes:
            raw = self._a.writes[key]
        else:
            raw = self._a.request("kv", get=key).get("value_json")
        return default if raw is None else json.loads(raw)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (anything JSON holds) under ``key`` when the step completes."""
        _check_key(key)
        try:
            raw = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ctx.kv.put({key!r}): the value is not JSON-serializable: {exc}") from None
        limit = self._a.limits["max_value_bytes"]
        if (size := len(raw.encode("utf-8", "surrogatepass"))) > limit:
            raise ValueError(f"ctx.kv.put({key!r}): the value is {size} bytes of JSON; the limit is {limit}")
        self._write(key, raw)

    def delete(self, key: str) -> None:
        """Delete ``key`` when the step completes (nothing happens if it is absent)."""
        self._write(_check_key(key), None)

    def _write(self, key: str, raw: str | None) -> None:
        if not self._a.open:
            self._a.request("kv")  # raises: the attempt is over
        writes = self._a.writes
        if key not in writes and len(writes) >= self._a.limits["max_writes"]:
            raise ValueError(
                f"a step attempt may write at most {self._a.limits['max_writes']} keys; split the work "
                "into several steps"
            )
        writes.pop(key, None)  # the last write of a key goes last
        writes[key] = raw

    def list(self, prefix: str = "", cursor: str | None = None, limit: int = 100) -> KVPage:
        """Keys starting with ``prefix`` in key order, after ``cursor``, at most ``limit`` (a page
        may hold fewer where this attempt deleted keys: page until the cursor is None)."""
        if not isinstance(prefix, str) or (cursor is not None and not isinstance(cursor, str)):
            raise TypeError("prefix and cursor must be strings")
        most = self._a.limits["max_list"]
        if not isinstance(limit, int) or not 0 < limit <= most:
            raise ValueError(f"limit must be an integer in 1..{most}")
        reply = self._a.request("kv", list=prefix, after=cursor, limit=limit)
        stored: dict[str, str | None] = {str(k): v for k, v in reply.get("entries", [])}
        nxt = reply.get("next")
        for key, raw in self._a.writes.items():  # this attempt's writes in the page's span
            if key.startswith(prefix) and (cursor is None or key > cursor) and (nxt is None or key <= nxt):
                stored[key] = raw
        items = sorted(((k, v) for k, v in stored.items() if v is not None), key=lambda kv: kv[0].encode())
        if len(items) > limit:
            items, nxt = items[:limit], items[limit - 1][0]
        return KVPage([(k, json.loads(v)) for k, v in items], nxt)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("iterate a page instead: for key, value in ctx.kv.list(prefix).items")


class Secrets:
    """``ctx.secrets``: the tenant's secrets by name, read from the kernel when asked for."""

    def __init__(self, attempt: _Attempt) -> None:
        self._a = attempt
        self._seen: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"a secret's name is a string, got {type(name).__name__}")
        if name not in self._seen:
            reply = self._a.request("secrets", name=name)
            if "missing" in reply:
                raise KeyError(str(reply["missing"]))
            self._seen[name] = str(reply["value"])
        return self._seen[name]

    def get(self, name: str, default: str | None = None) -> str | None:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __repr__(self) -> str:
        return "<ctx.secrets: read one by name, ctx.secrets['NAME']>"


class Unavailable:
    """``ctx.kv`` / ``ctx.secrets`` where no step attempt runs (an undo's context)."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"ctx.{self._what} is not available here: only inside a step.do callback")

    def __getitem__(self, name: str) -> Any:
        raise RuntimeError(f"ctx.{self._what} is not available here: only inside a step.do callback")


class Tools:
    """The open attempts of one run, by step key; set up by the runtime's core."""

    def __init__(self, ask: Ask, limits: dict[str, int] | None) -> None:
        self.ask = ask
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.open: dict[str, _Attempt] = {}

    def begin(self, key: str, attempt: int) -> tuple[KV, Secrets]:
        a = _Attempt(key, attempt, self.ask, self.limits)
        self.open[key] = a
        return KV(a), Secrets(a)

    def end(self, key: str, attempt: int) -> list[list[str | None]]:
        """Close the attempt; its writes, for the result."""
        a = self.open.get(key)
        if a is None or a.attempt != attempt:
            return []
        del self.open[key]
        a.open = False
        return [[k, v] for k, v in a.writes.items()]


def workspace(kv: Any) -> str:
    """``ctx.workspace()`` for the attempt behind ``kv`` (see ``StepContext.workspace``)."""
    if not isinstance(kv, KV):
        raise RuntimeError("ctx.workspace() is not available here: only inside a step.do callback")
    a = kv._a
    if not a.open:
        a.request("workspace")  # raises: the attempt is over
    reply = a.ask({"op": "workspace", "key": a.key, "attempt": a.attempt})
    if "error" in reply:
        raise RuntimeError(str(reply["error"]))
    return str(reply["path"])


_tools: Tools | None = None


def bind(tools: Tools | None) -> None:
    """Make ``tools`` the run's (one run per guest process)."""
    global _tools
    _tools = tools


def begin(key: str, attempt: int) -> tuple[Any, Any]:
    if _tools is None:
        return Unavailable("kv"), Unavailable("secrets")
    return _tools.begin(key, attempt)


def end(key: str, attempt: int) -> list[list[str | None]]:
    return _tools.end(key, attempt) if _tools is not None else []
