"""``airflow selfheal status`` and ``airflow selfheal gaps``: where each pipeline stands."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from airflow_selfheal.cli import breakers
from airflow_selfheal.cli.common import (
    STRUCTURED,
    CliError,
    Store,
    command,
    emit,
    open_store,
    parse_time,
    print_structured,
    shorten,
)
from airflow_selfheal.store.schema import FAILED, PARKED, PENDING, REDRIVING
from airflow_selfheal.store.types import utcnow


def pipeline_status(store: Store, pipeline: str, now: dt.datetime) -> dict[str, Any]:
    """
    One pipeline's health: completeness (watermark, gaps), freshness (newest done, lag), dead letters.

    Gaps are derived from the ledger alone (no timetable here): missing stretches, failed and stale
    intervals between the first ledger interval and the end of the newest one.
    """
    ledger = store.ledger
    entries = ledger.entries(pipeline)
    newest = ledger.newest_done(pipeline)
    gaps = []
    if entries:
        gaps = ledger.gaps(pipeline, start=entries[0].interval.start, end=max(e.interval.end for e in entries))
    counts = store.letters.status_counts(pipeline=pipeline)
    return {
        "pipeline": pipeline,
        "watermark": ledger.watermark(pipeline),
        "newest_done_start": newest.interval.start if newest else None,
        "newest_done_end": newest.interval.end if newest else None,
        "lag": now - newest.interval.end if newest else None,
        "gaps": len(gaps),
        "dead_letters_pending": counts[PENDING],
        "dead_letters_redriving": counts[REDRIVING],
        "dead_letters_parked": counts[PARKED],
    }


@command
def status(args: argparse.Namespace) -> None:
    store = open_store(args)
    if args.pipeline:
        store.require_pipeline(args.pipeline)
    names = [args.pipeline] if args.pipeline else store.pipelines()
    now = utcnow()
    pipelines = [pipeline_status(store, name, now) for name in names]
    # Breakers guard dependencies, not pipelines, so they are listed once, whole.
    breaker_rows = breakers.for_output(breakers.breaker_rows(store), args.output)
    if args.output in STRUCTURED:
        print_structured({"pipelines": pipelines, "breakers": breaker_rows}, args.output)
        return
    emit(pipelines, args.output, empty="No pipelines in the state store yet")
    print()
    emit(breaker_rows, args.output, empty="No circuit breakers")


def _dag_timetable(dag_id: str) -> tuple[Any, dt.datetime | None]:
    """The timetable and start date of a DAG as the scheduler knows it (its serialized form)."""
    from airflow.models.serialized_dag import SerializedDagModel

    dag = SerializedDagModel.get_dag(dag_id)
    if dag is None:
        raise CliError(f"DAG {dag_id!r} is not known to Airflow (not parsed yet, or misspelt)")
    return dag.timetable, dag.start_date


def _timetable_gaps(store: Any, args: argparse.Namespace) -> None:
    """Gaps against the DAG's own timetable: every interval it should have processed that is not done."""
    from airflow_selfheal.operators.catch_up import find_gaps

    timetable, start_date = _dag_timetable(args.dag_id)
    start = parse_time(args.start, option="--start") if args.start else start_date
    end = parse_time(args.end, option="--end") if args.end else dt.datetime.now(dt.UTC)
    if start is None:
        raise CliError(f"DAG {args.dag_id!r} has no start date: give --start")
    missed = find_gaps(store.ledger, args.pipeline, timetable, start=start, end=end, anchor=start_date)
    rows = [
        {
            "start": m.run.interval.start,
            "end": m.run.interval.end,
            "status": m.status,
            "logical_date": m.run.logical_date,
        }
        for m in missed
    ]
    emit(rows, args.output, empty=f"No gaps of DAG {args.dag_id} between {start.isoformat()} and {end.isoformat()}")


@command
def gaps(args: argparse.Namespace) -> None:
    store = open_store(args)
    if args.dag_id:
        _timetable_gaps(store, args)
        return
    store.require_pipeline(args.pipeline)
    entries = store.ledger.entries(args.pipeline)
    start = parse_time(args.start, option="--start") if args.start else None
    end = parse_time(args.end, option="--end") if args.end else None
    if entries:
        start = start or entries[0].interval.start
        end = end or max(e.interval.end for e in entries)
    if start is None or end is None:
        raise CliError(f"pipeline {args.pipeline!r} has no ledger intervals yet: give both --start and --end")
    if end <= start:
        raise CliError(f"--end {end.isoformat()} must be after --start {start.isoformat()}")
    errors = {e.interval: e.error for e in entries if e.status == FAILED}
    wide = args.output in STRUCTURED
    rows = [
        {
            "start": gap.interval.start,
            "end": gap.interval.end,
            "status": gap.status,
            "error": errors.get(gap.interval) if wide else shorten(errors.get(gap.interval), 80),
        }
        for gap in store.ledger.gaps(args.pipeline, start=start, end=end)
    ]
    emit(rows, args.output, empty=f"No gaps between {start.isoformat()} and {end.isoformat()}")
