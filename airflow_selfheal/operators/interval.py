"""The base of every self-healing interval operator: turns a task run into one engine run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from airflow_selfheal.engine.batch import run_intervals
from airflow_selfheal.engine.engine import IntervalEngine, Transform
from airflow_selfheal.engine.models import EngineSettings, RunContext
from airflow_selfheal.engine.sinks import SinkSpec
from airflow_selfheal.engine.sources import RecordSource
from airflow_selfheal.exceptions import CircuitOpenError, OrderingGapError, SelfHealError
from airflow_selfheal.intervals import Interval

log = logging.getLogger(__name__)

_RUN_TYPE_REASONS = {"backfill": "backfill", "scheduled": "scheduled", "manual": "manual"}


class SelfHealIntervalOperator(BaseOperator):
    """
    Processes the run's data interval exactly once in effect; subclasses say where records come from.

    :param destination_conn_id: connection of the destination table.
    :param destination_table: ``table`` or ``schema.table`` to write.
    :param write_strategy: ``replace_interval`` (delete the interval's rows, insert) or ``upsert`` (by key_columns).
    :param interval_column: destination column the engine fills with the interval start (replace deletes by it).
    :param timestamp_column: or a timestamp column; replace deletes ``start <= ts < end``.
    :param key_columns: key of the rows; needed for upsert, and it names dead letters so a record
        that later succeeds resolves its letter.
    :param target_fields: destination columns for tuple records, in order.
    :param transform: per-record function; return a record, a list, or ``None`` to drop the record.
        A record whose transform raises a permanent error is dead-lettered, the rest carry on.
    :param pipeline: name in the ledger and the dead-letter table (default ``<dag_id>.<task_id>``).
    :param chunk_size: records per chunk; memory is bounded by it.
    :param max_dead_letter_ratio: share of dead-lettered records above which the interval is not
        committed and the task fails without retry (a bug is likely). ``None`` disables it.
    :param max_dead_letters: the same as an absolute count.
    :param ordered: refuse to commit while an earlier interval is missing or failed.
    :param keep_versions: keep the rows replaced by the last k versions, for rollback.
    :param transient_errors: extra exception classes, dotted paths or predicates to treat as transient.
    :param permanent_errors: extra ones to treat as permanent (checked first).
    :param retry: in-task retry settings for transient batch errors
        (:class:`~airflow_selfheal.healing.retry.RetrySettings`); after its budget Airflow's own
        retries take over.
    :param selfheal_conn_id: connection of the state store (default ``[selfheal] conn_id``).
    :param table_prefix: prefix of the state tables.
    :param circuit_breaker: an optional :class:`~airflow_selfheal.breaker.CircuitBreaker` guarding the source.
    :param on_gap: what an ordered pipeline does when an earlier interval is missing: ``fail`` (fail
        the task, naming the gap) or ``retry`` (leave it to Airflow's retries, e.g. while catch-up
        fills the gap).
    :param lookback: after its own interval, reprocess the last k done intervals (late-arriving
        data), each as a new version with reason ``lookback``.
    :param catch_up: make this task the pipeline's batched catch-up: instead of its own window it
        processes missed intervals (from the DAG's timetable, oldest first) before its window.
        Give such a task its own pool and a low ``priority_weight`` so scheduled runs stay on time.
    :param catch_up_max_intervals: most intervals one catch-up task instance processes.
    :param catch_up_budget: time budget of one catch-up task instance; it stops before starting
        an interval once the budget is spent.
    :param catch_up_horizon: how far back catch-up looks (default: the DAG's start date).
    """

    template_fields: Sequence[str] = ("pipeline", "destination_table")
    ui_color = "#d4f1e4"

    def __init__(
        self,
        *,
        destination_conn_id: str,
        destination_table: str,
        write_strategy: str = "replace_interval",
        interval_column: str | None = None,
        timestamp_column: str | None = None,
        key_columns: Sequence[str] = (),
        target_fields: Sequence[str] = (),
        transform: Transform | None = None,
        pipeline: str | None = None,
        chunk_size: int = 10_000,
        max_dead_letter_ratio: float | None = 0.05,
        max_dead_letters: int | None = None,
        ordered: bool = False,
        keep_versions: int = 0,
        transient_errors: Sequence[Any] = (),
        permanent_errors: Sequence[Any] = (),
        retry: Any = None,
        selfheal_conn_id: str | None = None,
        table_prefix: str | None = None,
        circuit_breaker: Any = None,
        on_gap: str = "fail",
        lookback: int = 0,
        catch_up: bool = False,
        catch_up_max_intervals: int = 100,
        catch_up_budget: dt.timedelta | None = dt.timedelta(minutes=30),
        catch_up_horizon: dt.timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if on_gap not in ("fail", "retry"):
            raise ValueError(f"on_gap={on_gap!r} must be 'fail' or 'retry'")
        if lookback < 0:
            raise ValueError(f"lookback={lookback} must be >= 0")
        if catch_up_max_intervals < 1:
            raise ValueError(f"catch_up_max_intervals={catch_up_max_intervals} must be >= 1")
        if catch_up and lookback:
            raise ValueError("lookback belongs to the real-time task, not to a catch_up=True task")
        self.on_gap = on_gap
        self.lookback = lookback
        self.catch_up = catch_up
        self.catch_up_max_intervals = catch_up_max_intervals
        self.catch_up_budget = catch_up_budget
        self.catch_up_horizon = catch_up_horizon
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.destination_conn_id = destination_conn_id
        self.destination_table = destination_table
        self.transform = transform
        default_pipeline = f"{self.dag_id}.{self.task_id}" if self.has_dag() else self.task_id
        self.pipeline = pipeline or default_pipeline
        self.selfheal_conn_id = selfheal_conn_id
        self.table_prefix = table_prefix
        self.transient_errors = tuple(transient_errors)
        self.permanent_errors = tuple(permanent_errors)
        self.retry = retry
        self.circuit_breaker = circuit_breaker
        # Validate everything now, at parse time, with errors that name the argument.
        self.sink_spec = SinkSpec(
            table=destination_table,
            write_strategy=write_strategy,
            interval_column=interval_column,
            timestamp_column=timestamp_column,
            key_columns=tuple(key_columns),
            target_fields=tuple(target_fields),
        )
        self.settings = EngineSettings(
            pipeline=self.pipeline,
            chunk_size=chunk_size,
            max_dead_letter_ratio=max_dead_letter_ratio,
            max_dead_letters=max_dead_letters,
            ordered=ordered,
            keep_versions=keep_versions,
        )
        if keep_versions and not (interval_column or timestamp_column):
            raise ValueError("keep_versions needs interval_column or timestamp_column to find the rows to archive")
        self.classifier = self._build_classifier()
        if self.has_dag():
            from airflow_selfheal.timetables import check_timetable_has_windows

            check_timetable_has_windows(self.dag, task_id=self.task_id)

    def _build_classifier(self) -> Any:
        from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER, ErrorClassifier

        if not self.transient_errors and not self.permanent_errors:
            return DEFAULT_CLASSIFIER
        return ErrorClassifier(transient=self.transient_errors, permanent=self.permanent_errors)

    # -- hooks for subclasses -------------------------------------------------------------------

    def make_source(self, context: Any) -> RecordSource:
        """Where this run's records come from."""
        raise NotImplementedError

    # -- execution ------------------------------------------------------------------------------

    def build_engine(self, context: Any) -> IntervalEngine:
        """The engine for this task (the redrive and catch-up operators build one the same way)."""
        # pipeline and destination_table are templated: the rendered values win.
        return IntervalEngine(
            settings=dataclasses.replace(self.settings, pipeline=self.pipeline),
            source=self.make_source(context),
            sink=dataclasses.replace(self.sink_spec, table=self.destination_table),
            destination_conn_id=self.destination_conn_id,
            transform=self.transform,
            selfheal_conn_id=self.selfheal_conn_id,
            table_prefix=self.table_prefix,
            classifier=self.classifier,
            retry_settings=self.retry,
        )

    def window(self, context: Any) -> Interval:
        """The window this run processes (derived from the timetable when the data interval is empty)."""
        from airflow_selfheal.timetables import window_for_run

        interval, why = window_for_run(
            context["dag"].timetable,
            data_interval_start=context.get("data_interval_start"),
            data_interval_end=context.get("data_interval_end"),
            logical_date=context.get("logical_date"),
        )
        log.info("Processing window %s (%s)", interval, why)
        return interval

    def run_context(self, context: Any) -> RunContext:
        """Who runs the interval, and why (the version's reason)."""
        dag_run = context.get("dag_run")
        ti = context.get("ti")
        run_type_value = getattr(dag_run, "run_type", None)
        run_type = str(getattr(run_type_value, "value", run_type_value) or "").lower()
        conf = getattr(dag_run, "conf", None) or {}
        try_number = getattr(ti, "try_number", None)
        reason = conf.get("selfheal_reason") or _RUN_TYPE_REASONS.get(run_type, "manual")
        if try_number and try_number > 1 and reason == "scheduled":
            reason = "retry"
        return RunContext(
            reason=reason,
            dag_id=self.dag_id,
            task_id=self.task_id,
            run_id=getattr(dag_run, "run_id", None) or context.get("run_id"),
            try_number=try_number,
        )

    def execute(self, context: Any) -> dict[str, Any]:
        engine = self.build_engine(context)
        interval = self.window(context)
        if self.catch_up:
            return self.execute_catch_up(engine, interval, context)
        result = self.run_engine(engine, interval, self.run_context(context), context)
        if self.lookback:
            result["lookback"] = self.run_lookback(engine, interval, context)
        return result

    def _circuit_open(self, error: CircuitOpenError) -> NoReturn:
        """The breaker refused the call: defer until it may be probed (``wait``) or fail (``fail``)."""
        if self.circuit_breaker.when_open == "wait":
            # Hand the worker slot back; the triggerer wakes us when the breaker may be probed.
            self.defer(trigger=self.circuit_breaker.trigger(), method_name="execute_after_breaker")
        raise AirflowFailException(str(error)) from error

    def execute_after_breaker(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the breaker's trigger fired: run the interval again from the start."""
        log.info("Circuit breaker may be called again (%s); running the interval", event)
        return self.execute(context)

    def missed_intervals(self, engine: IntervalEngine, before: Interval, context: Any) -> list[Interval]:
        """Intervals the timetable expected before ``before`` that are missing, failed or stale, oldest first."""
        from airflow_selfheal.timetables import expected_intervals

        dag = context["dag"]
        if self.catch_up_horizon is not None:
            horizon = before.start - self.catch_up_horizon
        elif dag.start_date is not None:
            horizon = Interval(dag.start_date, dag.start_date).start
        else:
            raise ValueError("catch_up needs catch_up_horizon or a DAG start_date to know how far back to look")
        expected = expected_intervals(dag.timetable, horizon, before.start, anchor=dag.start_date)
        gaps = engine.ledger.gaps(
            engine.settings.pipeline,
            start=horizon,
            end=before.start,
            expected=expected,
            stale_after=engine.settings.stale_after,
        )
        return [gap.interval for gap in gaps]

    def execute_catch_up(self, engine: IntervalEngine, window: Interval, context: Any) -> dict[str, Any]:
        """Batched catch-up: process missed intervals before ``window`` within the limits, oldest first."""
        missed = self.missed_intervals(engine, window, context)
        todo = missed[: self.catch_up_max_intervals]
        log.info("Catch-up of %s: %s missed intervals, processing %s", engine.settings.pipeline, len(missed), len(todo))
        base = self.run_context(context)

        def context_for(_interval: Interval) -> RunContext:
            return RunContext(
                reason="catch-up",
                dag_id=base.dag_id,
                task_id=base.task_id,
                run_id=base.run_id,
                try_number=base.try_number,
            )

        # The batch is one call to the dependency as far as the breaker is concerned.
        breaker, permit = self.circuit_breaker, None
        if breaker is not None and todo:
            try:
                permit = breaker.allow_call(context)
            except CircuitOpenError as error:
                self._circuit_open(error)
        summary = run_intervals(
            engine,
            todo,
            context_for=context_for,
            budget_seconds=None if self.catch_up_budget is None else self.catch_up_budget.total_seconds(),
            stop_on_failure=engine.settings.ordered,
        )
        if permit is not None:
            if summary.last_error is not None:
                breaker.record_failure(summary.last_error, context, permit=permit)
            else:
                breaker.record_success(context, permit=permit)
        result = summary.as_dict()
        result["missed"] = len(missed)
        if summary.failed:
            # Retryable on purpose: the next try (or run) picks the failed intervals up again.
            raise SelfHealError(
                f"catch-up of {engine.settings.pipeline}: {len(summary.failed)} intervals failed: {summary.failed[:5]}"
            )
        return result

    def run_lookback(self, engine: IntervalEngine, window: Interval, context: Any) -> list[dict[str, Any]]:
        """Reprocess the last ``lookback`` done intervals before ``window`` (late-arriving data)."""
        done = engine.ledger.entries(engine.settings.pipeline, end=window.start, statuses=["done"])
        base = self.run_context(context)
        results = []
        for entry in done[-self.lookback :]:
            ctx = RunContext(
                reason="lookback",
                dag_id=base.dag_id,
                task_id=base.task_id,
                run_id=base.run_id,
                try_number=base.try_number,
            )
            results.append(self.run_engine(engine, entry.interval, ctx, context))
        return results

    def run_engine(self, engine: IntervalEngine, interval: Interval, ctx: RunContext, context: Any) -> dict[str, Any]:
        """Run one interval; permanent errors fail the task without burning Airflow retries."""
        guard: Callable[[Any], Any] | None = None
        if self.circuit_breaker is not None:
            guard = self.circuit_breaker.guard
        try:
            if guard is None:
                summary = engine.run(interval, ctx)
            else:
                with guard(context):
                    summary = engine.run(interval, ctx)
        except AirflowSkipException:
            raise  # breaker open with when_open="skip": the interval stays missing for catch-up
        except CircuitOpenError as error:
            self._circuit_open(error)
        except OrderingGapError:
            if self.on_gap == "retry":
                raise SelfHealError("ordered pipeline waits for an earlier interval; retrying later") from None
            raise
        except Exception as error:
            if self.classifier.is_transient(error):
                raise  # Airflow's retries (and retry_policy) take over
            hint = self.classifier.explain(error)
            raise AirflowFailException(f"{type(error).__name__}: {error}\n-- not retried: {hint}") from error
        return summary.as_dict()
