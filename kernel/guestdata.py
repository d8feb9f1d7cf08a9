"""What a guest sends, made safe: the step protocol's shared parsers and validators.

Pure functions over guest values (policies, texts, JSON, errors) and time formatting; they touch
no storage, no sandbox and no wake-up state, so every step kind can use them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

_KEY = re.compile(r"^(?P<name>.{1,256})#(?P<occ>\d{1,6})$", re.S)
_BACKOFFS = ("constant", "linear", "exponential")
MAX_DELAY = 365 * 86400.0


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def retry_delay(policy: dict[str, Any], attempt: int) -> float:
    """Delay after failed attempt number ``attempt`` (1-based)."""
    delay = float(policy["delay"])
    if policy["backoff"] == "linear":
        delay *= attempt
    elif policy["backoff"] == "exponential":
        delay *= 2 ** min(attempt - 1, 60)
    return min(delay, MAX_DELAY)


def _policy(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("policy must be an object")
    limit, delay, backoff, timeout = (
        raw.get("limit"),
        raw.get("delay"),
        raw.get("backoff"),
        raw.get("timeout"),
    )
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 10_000:
        raise ValueError(f"retry limit must be an integer in 0..10000, got {limit!r}")
    if not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY or math.isnan(delay):
        raise ValueError(f"retry delay must be 0..365 days, got {delay!r}")
    if backoff not in _BACKOFFS:
        raise ValueError(f"backoff must be one of {_BACKOFFS}, got {backoff!r}")
    if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_DELAY or math.isnan(timeout):
        raise ValueError(f"timeout must be > 0 and at most 365 days, got {timeout!r}")
    return {"limit": limit, "delay": float(delay), "backoff": backoff, "timeout": float(timeout)}


def _text(raw: Any, limit: int) -> str:
    """Guest text made storable: lone surrogates (from ``\\ud800`` escapes) become escapes again
    instead of failing the commit they ride in."""
    return str(raw)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _valid_text(raw: Any, what: str) -> str:
    """Guest text that must round-trip exactly (step names and keys, event types)."""
    text = str(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {text!r} is not valid Unicode text (a lone surrogate?)") from None
    return text


def _strict_json(value: Any) -> str | None:
    """``value`` as RFC 8259 JSON, or None if it holds NaN or Infinity (no other language reads them)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return None


def _not_json(what: str) -> dict[str, str]:
    return {"name": "NotJson", "message": (
        f"{what} a value with NaN or Infinity, which is not JSON (RFC 8259) and clients in other "
        "languages cannot read: return null or a string instead")}  # fmt: skip


MAX_TRACEBACK_BYTES = 4096


def _traceback(raw: Any) -> str:
    """A guest's traceback of its own frames, bounded to 4 KiB (its last lines kept: they say where)."""
    if not isinstance(raw, str) or not raw:
        return ""
    text = _text(raw, 1 << 20).encode("utf-8")
    if len(text) <= MAX_TRACEBACK_BYTES:
        return text.decode("utf-8")
    return "...\n" + text[-(MAX_TRACEBACK_BYTES - 4) :].decode("utf-8", "ignore")


def _error(raw: Any, limit: int = 4096) -> dict[str, str]:
    """A guest's error: ``name``, ``message`` and ``traceback`` (empty when it sent none)."""
    raw = raw if isinstance(raw, dict) else {}
    return {"name": _text(raw.get("name") or "Error", 200), "message": _text(raw.get("message") or "", limit),
            "traceback": _traceback(raw.get("traceback"))}  # fmt: skip
