"""Batched catch-up: one task instance processes many missed intervals, oldest first, each committed alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_selfheal import metrics
from airflow_selfheal.engine.engine import IntervalEngine
from airflow_selfheal.engine.models import RunContext
from airflow_selfheal.engine.prefetch import read_ahead
from airflow_selfheal.intervals import Interval

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    """What a batched catch-up did; the task's XCom."""

    pipeline: str
    total: int
    done: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    not_started: int = 0
    rows_written: int = 0
    rows_dead_lettered: int = 0
    seconds: float = 0.0
    last_error: BaseException | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "last_error"}


def run_intervals(
    engine: IntervalEngine,
    intervals: Sequence[Interval],
    *,
    context_for: Callable[[Interval], RunContext],
    budget_seconds: float | None = None,
    stop_on_failure: bool = False,
) -> BatchSummary:
    """
    Process ``intervals`` in the order given, each claimed, written and committed on its own.

    A crash loses at most the interval in flight; the time budget is checked before each interval
    so the task hands its worker slot back in time. Progress (done of total, rows, rate, time left)
    is logged after every interval. A SQL source is read one interval ahead on a worker thread
    (:mod:`~airflow_selfheal.engine.prefetch`); claims and commits stay strictly in order.

    :param stop_on_failure: stop at the first failed interval (ordered pipelines: later intervals
        could not commit anyway); otherwise carry on and report the failures at the end.
    """
    source = engine.source
    ahead = read_ahead(source, intervals, chunk_size=engine.settings.chunk_size)
    if ahead is not None:
        engine.source = ahead
    try:
        return _run_in_order(engine, intervals, context_for, budget_seconds, stop_on_failure)
    finally:
        if ahead is not None:
            engine.source = source
            ahead.close()


def _run_in_order(
    engine: IntervalEngine,
    intervals: Sequence[Interval],
    context_for: Callable[[Interval], RunContext],
    budget_seconds: float | None,
    stop_on_failure: bool,
) -> BatchSummary:
    started = time.monotonic()
    summary = BatchSummary(pipeline=engine.settings.pipeline, total=len(intervals))
    for index, interval in enumerate(intervals):
        elapsed = time.monotonic() - started
        if budget_seconds is not None and index and elapsed >= budget_seconds:
            summary.not_started = len(intervals) - index
            log.info(
                "Catch-up time budget of %.0f s spent; %s intervals left for the next run",
                budget_seconds,
                summary.not_started,
            )
            break
        try:
            result = engine.run(interval, context_for(interval))
        except Exception as error:
            summary.last_error = error
            summary.failed.append({"interval": str(interval), "error": f"{type(error).__name__}: {error}"[:500]})
            log.warning("Catch-up of %s failed: %s", interval, error)
            if stop_on_failure:
                summary.not_started = len(intervals) - index - 1
                break
            continue
        summary.done += 1
        summary.rows_written += result.rows_written
        summary.rows_dead_lettered += result.rows_dead_lettered
        _log_progress(summary, index + 1, time.monotonic() - started)
    summary.seconds = round(time.monotonic() - started, 3)
    metrics.incr("catch_up_intervals", summary.done, tags={"pipeline": summary.pipeline})
    return summary


def _log_progress(summary: BatchSummary, processed: int, elapsed: float) -> None:
    rate = processed / elapsed if elapsed > 0 else 0.0
    remaining = summary.total - processed
    eta = remaining / rate if rate else 0.0
    log.info(
        "Catch-up %s: %s/%s intervals done, %s rows, %.1f intervals/s, about %.0f s left",
        summary.pipeline,
        summary.done,
        summary.total,
        summary.rows_written,
        rate,
        eta,
    )
