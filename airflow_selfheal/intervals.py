"""Data intervals as plain values, independent of Airflow's and pendulum's types."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


def as_utc(value: dt.datetime, *, argument: str = "datetime") -> dt.datetime:
    """Return ``value`` as an aware UTC datetime (pendulum included); naive values are refused."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{argument} must be a datetime, got {type(value).__name__}: {value!r}")
    if value.tzinfo is None:
        raise ValueError(f"{argument}={value!r} is naive: pass an aware datetime (UTC)")
    utc = value.astimezone(dt.UTC)
    return dt.datetime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=dt.UTC)


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open data interval ``[start, end)`` in UTC."""

    start: dt.datetime
    end: dt.datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start, argument="interval start"))
        object.__setattr__(self, "end", as_utc(self.end, argument="interval end"))
        if self.end < self.start:
            raise ValueError(f"interval end {self.end.isoformat()} is before its start {self.start.isoformat()}")

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"
