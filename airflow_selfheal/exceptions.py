"""Exceptions users can raise or catch; each says what to do next."""

from __future__ import annotations


class SelfHealError(Exception):
    """Base class of every error raised by airflow-selfheal."""


class TransientError(SelfHealError):
    """Raise from user code to say: this failure will pass, retry it (e.g. an upstream 503)."""


class PermanentError(SelfHealError):
    """Raise from user code to say: retrying cannot help (bad data, a bug, a broken contract)."""


class InvalidIdentifierError(SelfHealError, ValueError):
    """A table prefix, schema or column name is not a plain SQL identifier."""


class ClaimLostError(SelfHealError):
    """Another worker took over this interval's claim (ours went stale); our work is not committed."""


class IntervalBusyError(SelfHealError):
    """Another worker holds a live claim on the interval."""


class DeadLetterCeilingExceeded(PermanentError):
    """Too many records of one interval failed: a bug is far more likely than bad data."""


class OrderingGapError(PermanentError):
    """An ordered pipeline may not commit an interval while an earlier one is missing or failed."""


class CircuitOpenError(SelfHealError):
    """The circuit breaker guarding a dependency is open; the dependency was not called."""
