"""A trigger that waits, in the triggerer, until a circuit breaker may be called again."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_selfheal.healing import breaker_state as machine


class CircuitBreakerTrigger(BaseTrigger):
    """
    Polls the state store until the breaker is closed, due for a probe, or has a free probe slot.

    It carries the breaker's name and store coordinates, not the breaker object, so it serializes
    into the metadata database and runs in the triggerer without the DAG file. It only reads: the
    deferred task asks the breaker for admission again when it resumes, so a lost race defers anew.

    :param breaker_name: name of the breaker.
    :param selfheal_conn_id: connection of the state store.
    :param table_prefix: prefix of the state tables.
    :param schema: schema of the state tables (``None``: the connection's default).
    :param half_open_max_probes: the breaker's probe slots (a half-open breaker with a free one may be probed).
    :param probe_timeout: seconds after which an unreported probe slot counts as free.
    :param poll_interval: longest sleep between two reads, in seconds; the trigger wakes earlier when
        the breaker's next probe time comes sooner.
    """

    def __init__(
        self,
        *,
        breaker_name: str,
        selfheal_conn_id: str,
        table_prefix: str,
        schema: str | None = None,
        half_open_max_probes: int = 1,
        probe_timeout: float = 1800.0,
        poll_interval: float = 30.0,
    ) -> None:
        super().__init__()
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        self.breaker_name = breaker_name
        self.selfheal_conn_id = selfheal_conn_id
        self.table_prefix = table_prefix
        self.schema = schema
        self.half_open_max_probes = half_open_max_probes
        self.probe_timeout = probe_timeout
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and keyword arguments that rebuild this trigger in the triggerer."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "breaker_name": self.breaker_name,
                "selfheal_conn_id": self.selfheal_conn_id,
                "table_prefix": self.table_prefix,
                "schema": self.schema,
                "half_open_max_probes": self.half_open_max_probes,
                "probe_timeout": self.probe_timeout,
                "poll_interval": self.poll_interval,
            },
        )

    def _check(self) -> tuple[bool, str, dt.datetime | None]:
        """One synchronous read: (may proceed, state, next probe time)."""
        from airflow_selfheal.hooks.circuit_breaker import CircuitBreakerHook

        hook = CircuitBreakerHook(self.selfheal_conn_id, table_prefix=self.table_prefix, schema=self.schema or "")
        found = hook.get(self.breaker_name)
        if found is None:
            return True, machine.CLOSED, None
        ready = machine.may_proceed(
            found.machine,
            hook.clock(),
            half_open_max_probes=self.half_open_max_probes,
            probe_timeout=dt.timedelta(seconds=self.probe_timeout),
        )
        return ready, found.state, found.next_probe_at

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield one event once the breaker may be called; store outages are logged and waited out."""
        from asgiref.sync import sync_to_async

        check = sync_to_async(self._check)
        while True:
            next_probe_at: dt.datetime | None = None
            try:
                ready, state, next_probe_at = await check()
            except Exception:
                self.log.warning("Breaker %s: state store unreadable; polling again", self.breaker_name, exc_info=True)
            else:
                if ready:
                    yield TriggerEvent({"status": "ready", "breaker": self.breaker_name, "state": state})
                    return
            await asyncio.sleep(self._sleep_for(next_probe_at))

    def _sleep_for(self, next_probe_at: dt.datetime | None) -> float:
        if next_probe_at is None:
            return self.poll_interval
        until = (next_probe_at - dt.datetime.now(dt.UTC)).total_seconds()
        return max(0.05, min(self.poll_interval, until))
