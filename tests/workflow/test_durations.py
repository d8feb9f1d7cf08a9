"""Durations accepted by sleeps, time-outs and retry delays."""

from __future__ import annotations

import datetime as dt

import pytest

from tenantflow.workflow import parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("10 seconds", 10.0),
        ("1 second", 1.0),
        ("100ms", 0.1),
        ("3 mins", 180.0),
        ("24 hours", 86400.0),
        ("2 days", 172800.0),
        ("1 week", 604800.0),
        ("1 year", 365 * 86400.0),
        (dt.timedelta(minutes=2), 120.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "10 parsecs", "-5 seconds", -1, True, None, "10"])
def test_bad_durations_say_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)  # type: ignore[arg-type]
