"""Redrive a pipeline's dead letters through its own transform and write path."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from airflow.sdk import BaseOperator

from airflow_selfheal.engine.redrive import Redriver, RedriveSettings
from airflow_selfheal.operators.interval import SelfHealIntervalOperator


class DeadLetterRedriveOperator(BaseOperator):
    """
    Takes pending dead letters of ``pipeline_task``'s pipeline and runs them again.

    Each record goes through the pipeline's transform and is written by key into the same
    destination; a record that succeeds resolves its letter, one that fails again raises its attempt
    count and, after ``max_attempts``, is parked (no longer picked up until a person re-queues it,
    e.g. with ``airflow selfheal dlq redrive``). Letters go oldest first; see
    :mod:`airflow_selfheal.engine.redrive` for how redriven records interleave with new data.

    :param pipeline_task: the interval operator (or ``@task.selfheal`` task) whose letters to redrive;
        its transform, destination, key and circuit breaker are used.
    :param max_records: most letters this run takes.
    :param batch_size: letters claimed and written per batch.
    :param records_per_second: rate limit, so a recovering dependency is not flooded.
    :param max_attempts: failures (the original included) after which a letter is parked.
    :param error_class: only letters of this error class (as stored, e.g. ``ValueError``).
    :param interval_from: only letters of intervals starting at or after this.
    :param interval_to: only letters of intervals ending at or before this.
    :param older_than: only letters last seen longer ago than this.
    :param stale_after: a claim of a redrive that died is taken over after this.
    """

    template_fields: Sequence[str] = ("error_class",)
    ui_color = "#f6e3c8"

    def __init__(
        self,
        *,
        pipeline_task: Any,
        max_records: int = 1000,
        batch_size: int = 100,
        records_per_second: float | None = None,
        max_attempts: int = 5,
        error_class: str | None = None,
        interval_from: dt.datetime | None = None,
        interval_to: dt.datetime | None = None,
        older_than: dt.timedelta | None = None,
        stale_after: dt.timedelta = dt.timedelta(minutes=30),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        task = getattr(pipeline_task, "operator", pipeline_task)  # a TaskFlow XComArg points at its operator
        if not isinstance(task, SelfHealIntervalOperator):
            raise TypeError(
                "pipeline_task must be a self-healing interval operator or @task.selfheal task, "
                f"got {type(task).__name__}"
            )
        if not task.sink_spec.key_columns:
            raise ValueError(f"pipeline_task {task.task_id!r} has no key_columns; a redrive needs them to write by key")
        self.pipeline_task = task
        self.redrive_settings = RedriveSettings(
            max_records=max_records,
            batch_size=batch_size,
            records_per_second=records_per_second,
            max_attempts=max_attempts,
        )
        self.error_class = error_class
        self.interval_from = interval_from
        self.interval_to = interval_to
        self.older_than = older_than
        self.stale_after = stale_after

    def execute(self, context: Any) -> dict[str, Any]:
        task = self.pipeline_task
        engine = task.build_engine(context)
        base = task.run_context(context)
        base.reason, base.task_id = "redrive", self.task_id
        breaker = task.circuit_breaker
        guard: Callable[[], AbstractContextManager[Any]] | None = None
        if breaker is not None:

            def guard() -> AbstractContextManager[Any]:
                return breaker.guard(context)

        filters = {
            "error_class": self.error_class,
            "interval_from": self.interval_from,
            "interval_to": self.interval_to,
            "older_than": self.older_than,
            "stale_after": self.stale_after,
        }
        summary = Redriver(engine, self.redrive_settings).run(context=base, claim_filters=filters, guard=guard)
        return summary.as_dict()
