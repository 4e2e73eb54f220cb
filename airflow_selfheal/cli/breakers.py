"""
The CLI's only door to circuit breakers: rows for display, reset and force-open.

Everything goes through :class:`~airflow_selfheal.hooks.circuit_breaker.CircuitBreakerHook`, so the
breaker's compare-and-set and its heal events apply to changes made by hand too. Should the hook's
API change, only this module follows it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from airflow_selfheal.cli.common import STRUCTURED, CliError, Store, shorten

if TYPE_CHECKING:
    from airflow_selfheal.hooks.circuit_breaker import BreakerSnapshot, CircuitBreakerHook


def _hook(store: Store) -> CircuitBreakerHook:
    from airflow_selfheal.hooks.circuit_breaker import CircuitBreakerHook

    return CircuitBreakerHook(store.conn_id, table_prefix=store.table_prefix, schema=store.schema or "")


def _row(snapshot: BreakerSnapshot) -> dict[str, Any]:
    return {
        "name": snapshot.name,
        "state": snapshot.state,
        "consecutive_failures": snapshot.consecutive_failures,
        "window_calls": snapshot.window_calls,
        "window_failures": snapshot.window_failures,
        "opened_at": snapshot.machine.opened_at,
        "next_probe_at": snapshot.next_probe_at,
        "open_count": snapshot.open_count,
        "probes_in_flight": snapshot.probes_in_flight,
        "last_error": snapshot.last_error,
        "updated_at": snapshot.updated_at,
    }


def breaker_rows(store: Store) -> list[dict[str, Any]]:
    """Every breaker, by name."""
    return [_row(snapshot) for snapshot in _hook(store).list_states()]


def reset_breaker(store: Store, name: str) -> dict[str, Any]:
    """Close ``name`` and forget its counters; it must exist."""
    hook = _hook(store)
    if hook.get(name) is None:
        raise CliError(f"unknown circuit breaker {name!r}; 'airflow selfheal breaker list' shows them")
    return _row(hook.reset(name).snapshot)


def open_breaker(store: Store, name: str, *, open_for: dt.timedelta | None, reason: str | None) -> dict[str, Any]:
    """Open ``name`` by hand (created open if never used), for ``open_for`` or until reset."""
    return _row(_hook(store).force_open(name, open_for, reason=reason).snapshot)


def for_output(rows: list[dict[str, Any]], output: str) -> list[dict[str, Any]]:
    """Rows as the output shows them: tables leave out the window counts and cut the last error short."""
    if output in STRUCTURED:
        return rows
    return [
        {
            **{key: value for key, value in row.items() if not key.startswith("window_")},
            "last_error": shorten(row["last_error"], 40),
        }
        for row in rows
    ]
