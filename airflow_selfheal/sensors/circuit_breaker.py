"""A gate in front of tasks that use a dependency: passes while its circuit breaker lets calls through."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator

from airflow_selfheal.breaker import WHEN_OPEN, CircuitBreaker, Permit, WhenOpen

if TYPE_CHECKING:
    from airflow.sdk import Context


class CircuitBreakerSensor(BaseSensorOperator):
    """
    Succeeds when the breaker is closed or admits this DAG run as its half-open probe.

    The probe slot is taken for the whole DAG run, so the run's downstream tasks (with the breaker's
    ``on_success`` / ``on_failure`` callbacks, or a guard) report the probe's outcome. While the
    breaker is open the sensor acts per ``when_open``: ``wait`` defers to
    :class:`~airflow_selfheal.triggers.circuit_breaker.CircuitBreakerTrigger` and holds no worker
    slot (or pokes, with ``deferrable=False``), ``skip`` skips the sensor and so its downstream
    tasks, ``fail`` raises :class:`~airflow_selfheal.exceptions.CircuitOpenError`.

    :param breaker: the :class:`~airflow_selfheal.breaker.CircuitBreaker` to watch.
    :param when_open: overrides the breaker's ``when_open`` for this sensor.
    :param deferrable: wait in the triggerer (default) instead of poking from a worker.
    :param poke_interval: seconds between state store reads while waiting (the trigger also wakes
        when the breaker's next probe is due).
    """

    template_fields: Sequence[str] = ()
    # The breaker is shared configuration: copies of the task must use the same object, not clones.
    shallow_copy_attrs: Sequence[str] = ("breaker",)

    def __init__(
        self,
        *,
        breaker: CircuitBreaker,
        when_open: WhenOpen | None = None,
        deferrable: bool = True,
        poke_interval: dt.timedelta | float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        if not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        if when_open is not None and when_open not in WHEN_OPEN:
            raise ValueError(f"when_open={when_open!r} must be one of {', '.join(WHEN_OPEN)}")
        self.breaker = breaker
        self.when_open: WhenOpen = when_open or breaker.when_open
        self.deferrable = deferrable

    def poke(self, context: Context) -> bool:
        """One admission attempt for this DAG run (the blocking and reschedule modes)."""
        permit = self.breaker.try_allow_call(context, scope="run")
        if not permit.allowed:
            self.log.info("Breaker %s is %s; next probe at %s", self.breaker.name, permit.state, permit.retry_at)
        return permit.allowed

    def execute(self, context: Context) -> Any:
        """Pass, skip, fail or wait, depending on the breaker and ``when_open``."""
        return self._evaluate(context, started_at=dt.datetime.now(dt.UTC))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None, started_at: str = "") -> Any:
        """Resume after the trigger fired: ask for admission again (another run may have taken the probe)."""
        start = dt.datetime.fromisoformat(started_at) if started_at else dt.datetime.now(dt.UTC)
        return self._evaluate(context, started_at=start)

    def _evaluate(self, context: Context, *, started_at: dt.datetime) -> Any:
        permit = self.breaker.try_allow_call(context, scope="run")
        if permit.allowed:
            self.log.info(
                "Breaker %s is %s%s",
                self.breaker.name,
                permit.state,
                " (this run is the probe)" if permit.probe else "",
            )
            return None
        if self.when_open != "wait":
            self._refuse(permit)
        if not self.deferrable:
            return super().execute(context)
        remaining = self.timeout - (dt.datetime.now(dt.UTC) - started_at).total_seconds()
        self.log.info(
            "Breaker %s is %s; deferring until it may be probed (next probe at %s)",
            self.breaker.name,
            permit.state,
            permit.retry_at,
        )
        self.defer(
            trigger=self.breaker.trigger(poll_interval=max(self.poke_interval, 0.05)),
            method_name="execute_complete",
            kwargs={"started_at": started_at.isoformat()},
            timeout=dt.timedelta(seconds=max(remaining, 0.0)),
        )

    def _refuse(self, permit: Permit) -> None:
        """Raise per this sensor's ``when_open`` (``skip`` or ``fail``)."""
        if self.when_open == "skip":
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(f"circuit breaker {self.breaker.name!r} is {permit.state}; skipping")
        from airflow_selfheal.exceptions import CircuitOpenError

        raise CircuitOpenError(
            f"circuit breaker {self.breaker.name!r} is {permit.state}; next probe at {permit.retry_at}"
        )
