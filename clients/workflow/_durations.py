"""Durations: seconds (int/float), ``timedelta``, or strings such as ``"10 seconds"``, ``"24 hours"``."""

from __future__ import annotations

import datetime as _dt
import re

_UNITS = {
    "ms": 0.001,
    "millisecond": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "week": 7 * 86400.0,
    "month": 30 * 86400.0,
    "year": 365 * 86400.0,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")

Duration = int | float | str | _dt.timedelta


def parse_duration(value: Duration) -> float:
    """Return ``value`` in seconds; raise ``ValueError`` naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else ""
        if unit not in _UNITS and unit.endswith("s"):
            unit = unit[:-1]
        if not match or unit not in _UNITS:
            raise ValueError(
                f"invalid duration {value!r}: use seconds (a number) or '<n> "
                "second|minute|hour|day|week|month|year[s]'"
            )
        seconds = float(match.group(1)) * _UNITS[unit]
    else:
        raise ValueError(
            f"invalid duration {value!r}: use seconds, a timedelta or a string like '10 seconds'"
        )
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def until(when: _dt.datetime | float | int) -> float:
    if isinstance(when, _dt.datetime):
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        return when.timestamp()
    if isinstance(when, int | float) and not isinstance(when, bool):
        return float(when)
    raise ValueError(f"sleep_until needs a datetime or epoch seconds, got {when!r}")
