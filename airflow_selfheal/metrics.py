"""Metrics through Airflow's StatsD/OpenTelemetry facade; a metrics backend that is down never fails a task."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def incr(name: str, count: int = 1, *, tags: dict[str, str] | None = None) -> None:
    """Count ``name`` (prefixed ``selfheal.``) by ``count``; errors are logged, not raised."""
    if count <= 0:
        return
    try:
        from airflow.sdk.observability import stats

        stats.incr(f"selfheal.{name}", count, tags=tags or {})
    except Exception:
        log.debug("Could not emit metric selfheal.%s", name, exc_info=True)


def gauge(name: str, value: float, *, tags: dict[str, str] | None = None) -> None:
    """Set gauge ``name`` (prefixed ``selfheal.``); errors are logged, not raised."""
    try:
        from airflow.sdk.observability import stats

        stats.gauge(f"selfheal.{name}", value, tags=tags or {})
    except Exception:
        log.debug("Could not emit metric selfheal.%s", name, exc_info=True)
