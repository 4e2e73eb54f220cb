"""
Batched catch-up vs Airflow backfill, through the real scheduler (issue 5).

200 missed hourly intervals of 1,000 rows each; source, destinations and state store on PostgreSQL.

(a) batched: one DAG run triggered through REST whose single task (``catch_up=True``,
    ``catch_up_max_intervals=200``) processes every missed interval, oldest first.
(b) backfill: ``airflow backfill create`` of one DAG run per interval (``--max-active-runs 4``) on a
    fresh pipeline and destination.

Both destinations must hold exactly the source's rows (else exit 1). Prints both times, their
ratio, where the batched time goes, and peak RSS of the batched task vs one-interval tasks.

Run from the repository root: ``.venv/bin/python -m benchmarks.catch_up_speed``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pstats
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    BENCH_CONN_ID,
    HOUR,
    CorrectnessError,
    Scratch,
    all_runs,
    check_destination,
    create_destination,
    create_source,
    dag_file,
    describe,
    exit_status,
    pg_engine,
    return_value,
    running_airflow,
    say,
    seconds,
    task_instance,
    wait_for_count,
    write_dags,
)
from tests.airflow_harness import AirflowServer

TARGET_RATIO = 20.0


@dataclass
class Setup:
    intervals: int
    rows: int
    max_active_runs: int
    t0: dt.datetime
    source: str
    batched_dag: str
    batched_dest: str
    backfill_dag: str
    backfill_dest: str
    prefix: str

    def windows(self) -> list[tuple[dt.datetime, dt.datetime]]:
        return [(self.t0 + h * HOUR, self.t0 + (h + 1) * HOUR) for h in range(self.intervals)]


def run_batched(server: AirflowServer, setup: Setup) -> dict[str, Any]:
    """Trigger the catch-up DAG once and time it from trigger to success."""
    # An @hourly run processes the hour before its logical date: at t0 + (n+1)h its own window is hour n,
    # and the n hours before it, all missing from the ledger, are the catch-up's work.
    logical = setup.t0 + (setup.intervals + 1) * HOUR
    started = time.monotonic()
    run_id = server.trigger(setup.batched_dag, logical_date=logical)
    state = server.wait_for_run(setup.batched_dag, run_id, timeout=900)
    wall = time.monotonic() - started
    if state != "success":
        raise CorrectnessError(
            f"batched run {run_id} ended {state}:\n{server.task_log(setup.batched_dag, run_id, 'load')[-4000:]}"
        )
    run = server.api("GET", f"/dags/{setup.batched_dag}/dagRuns/{run_id}")
    ti = task_instance(server, setup.batched_dag, run_id)
    xcom = return_value(server, setup.batched_dag, run_id)
    log = server.task_log(setup.batched_dag, run_id, "load")
    return {
        "wall": wall,
        "seconds": seconds(run["end_date"], run["queued_at"]),
        "to_task_start": seconds(ti["start_date"], run["queued_at"]),
        "task": seconds(ti["end_date"], ti["start_date"]),
        "to_execute": seconds(log_time(log, "Processing window"), ti["start_date"]),
        "gap_detection": seconds(log_time(log, "Catch-up of"), log_time(log, "Processing window")),
        "engine": float(xcom["seconds"]),
        "done": int(xcom["done"]),
        "rows_written": int(xcom["rows_written"]),
        "peak_rss_kb": xcom.get("peak_rss_kb"),
        "rss_start_kb": xcom.get("rss_start_kb"),
    }


def log_time(log: str, marker: str) -> str | None:
    """Timestamp of the first task-log line containing ``marker``."""
    return next((line.split(" ", 1)[0] for line in log.splitlines() if marker in line), None)


def run_backfill(server: AirflowServer, setup: Setup) -> dict[str, Any]:
    """``airflow backfill create`` over the same intervals; time it from creation to the last run's end."""
    first, last = setup.t0 + HOUR, setup.t0 + setup.intervals * HOUR  # logical dates of hours 0 .. n-1
    started = time.monotonic()
    server.cli(
        "backfill", "create", "--dag-id", setup.backfill_dag,
        "--from-date", first.isoformat(), "--to-date", last.isoformat(),
        "--reprocess-behavior", "none", "--max-active-runs", str(setup.max_active_runs),
    )  # fmt: skip
    say(f"  backfill created ({time.monotonic() - started:.1f} s for the CLI); waiting for {setup.intervals} runs")
    wait_for_count(
        server, setup.backfill_dag, setup.intervals, timeout=1200, what="backfill runs finished",
        run_type="backfill", state=["success", "failed"],
    )  # fmt: skip
    wall = time.monotonic() - started
    backfill = server.api("GET", "/backfills", params={"dag_id": setup.backfill_dag})["backfills"][0]
    runs = all_runs(server, setup.backfill_dag, run_type="backfill")
    failed = [r["dag_run_id"] for r in runs if r["state"] != "success"]
    if failed:
        raise CorrectnessError(f"{len(failed)} backfill runs did not succeed: {failed[:5]}")
    # Every run succeeded, so every run has an end_date.
    last_end = max((str(r["end_date"]) for r in runs), key=dt.datetime.fromisoformat)
    durations = [seconds(r["end_date"], r["start_date"]) for r in runs]
    # Memory of one-interval tasks: 20 runs spread over the backfill are enough for a median.
    sample = sorted(runs, key=lambda r: r["logical_date"])[:: max(1, len(runs) // 20)]
    peaks, starts = [], []
    for r in sample:
        xcom = return_value(server, setup.backfill_dag, r["dag_run_id"])
        if xcom.get("peak_rss_kb"):
            peaks.append(int(xcom["peak_rss_kb"]))
            starts.append(int(xcom["rss_start_kb"]))
    return {
        "wall": wall,
        "seconds": seconds(last_end, backfill["created_at"]),
        "runs": len(runs),
        "run_durations": durations,
        "peak_rss_kb": statistics.median(peaks) if peaks else None,
        "rss_start_kb": statistics.median(starts) if starts else None,
        "rss_samples": len(peaks),
    }


def mb(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.0f} MB"


def report(setup: Setup, batched: dict[str, Any], backfill: dict[str, Any], problems: list[str]) -> None:
    ratio = backfill["seconds"] / batched["seconds"]
    rows = setup.intervals * setup.rows
    rate = batched["rows_written"] / batched["engine"] if batched["engine"] else float("nan")
    per_interval_ms = batched["engine"] / max(1, batched["done"]) * 1000
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    b_peak, f_peak = batched["peak_rss_kb"], backfill["peak_rss_kb"]
    peak_ratio = b_peak / f_peak if b_peak and f_peak else float("nan")
    lines = [
        "",
        f"== catch-up speed: {setup.intervals} missed hourly intervals x {setup.rows} rows, all on PostgreSQL ==",
        f"batched : {batched['seconds']:7.1f} s  one run with one catch_up=True task, REST trigger -> run success"
        f" (client wall {batched['wall']:.1f} s)",
        f"          queued -> task start {batched['to_task_start']:.1f} s; task {batched['task']:.1f} s ="
        f" start-up {batched['to_execute']:.1f} s + gap detection {batched['gap_detection']:.1f} s + engine"
        f" {batched['engine']:.1f} s + the rest",
        f"          engine: {batched['done']} intervals, {rate:,.0f} rows/s, {per_interval_ms:.0f} ms per interval",
        f"backfill: {backfill['seconds']:7.1f} s  {backfill['runs']} DAG runs, max_active_runs={setup.max_active_runs},"
        f" backfill created -> last run finished (with the CLI's start: {backfill['wall']:.1f} s)",
        f"          per run (start -> end): {describe(backfill['run_durations'])}",
        f"ratio backfill / batched: {ratio:.1f}x (issue 5 target >= {TARGET_RATIO:.0f}x: {verdict})",
        f"peak RSS during execute: batched {mb(b_peak)} ({rows:,} rows) vs one-interval run {mb(f_peak)}"
        f" ({setup.rows:,} rows, median of {backfill['rss_samples']}): ratio {peak_ratio:.2f}",
        f"          growth over RSS at execute start: batched {mb((b_peak or 0) - (batched['rss_start_kb'] or 0))},"
        f" one-interval {mb((f_peak or 0) - (backfill['rss_start_kb'] or 0))}",
        "destinations: " + ("; ".join(problems) if problems else f"both hold exactly the {rows:,} source rows"),
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, default=200, help="missed hourly intervals (default 200)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per interval (default 1000)")
    parser.add_argument("--max-active-runs", type=int, default=4, help="backfill max_active_runs (default 4)")
    parser.add_argument(
        "--cprofile",
        metavar="PATH",
        help="profile the batched task's execute, write the stats to PATH and print its top functions "
        "(the profiler slows the batched run: the ratio is then not the measurement)",
    )
    args = parser.parse_args(argv)

    suffix = uuid.uuid4().hex[:8]
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    engine = pg_engine()
    scratch = Scratch(engine)
    setup = Setup(
        intervals=args.intervals,
        rows=args.rows,
        max_active_runs=args.max_active_runs,
        t0=now - (args.intervals + 48) * HOUR,  # all in the past: Airflow backfills no future dates
        source=scratch.table(f"bench_src_{suffix}"),
        batched_dag=f"bench_batched_{suffix}",
        batched_dest=scratch.table(f"bench_batched_{suffix}"),
        backfill_dag=f"bench_backfill_{suffix}",
        backfill_dest=scratch.table(f"bench_backfill_{suffix}"),
        prefix=scratch.prefix(f"bench{suffix}_"),
    )
    common = {"table_prefix": setup.prefix}
    end = setup.t0 + (setup.intervals + 1) * HOUR
    dags = {
        f"{setup.batched_dag}.py": dag_file(
            dag_id=setup.batched_dag,
            source=setup.source,
            destination=setup.batched_dest,
            start=setup.t0,
            end=end,
            task_kwargs={
                **common,
                "pipeline": "orders_batched",
                "catch_up": True,
                "catch_up_max_intervals": setup.intervals,
                "catch_up_budget": dt.timedelta(hours=2),
            },
            profile_to=os.path.abspath(args.cprofile) if args.cprofile else None,
        ),
        f"{setup.backfill_dag}.py": dag_file(
            dag_id=setup.backfill_dag,
            source=setup.source,
            destination=setup.backfill_dest,
            start=setup.t0,
            end=end,
            max_active_runs=setup.max_active_runs,
            task_kwargs={**common, "pipeline": "orders_backfill"},
        ),
    }

    def run() -> int:
        say(f"source: {setup.intervals} hours x {setup.rows} rows from {setup.t0.isoformat()} ({BENCH_CONN_ID})")
        create_source(engine, setup.source, setup.t0, setup.intervals, setup.rows)
        create_destination(engine, setup.batched_dest)
        create_destination(engine, setup.backfill_dest)
        with running_airflow() as server:
            write_dags(server, dags)
            # The backfill goes first: the first task of a fresh stack pays a one-off start-up of several
            # seconds, which would land on the single batched task otherwise (a real catch-up runs warm).
            say(f"(b) airflow backfill create: {setup.intervals} runs, max_active_runs={setup.max_active_runs}")
            backfill = run_backfill(server, setup)
            say(f"  done in {backfill['seconds']:.1f} s")
            say("(a) batched catch-up: one triggered run")
            batched = run_batched(server, setup)
            say(f"  done in {batched['seconds']:.1f} s")
        problems = [
            *check_destination(engine, setup.batched_dest, setup.source, setup.windows()),
            *check_destination(engine, setup.backfill_dest, setup.source, setup.windows()),
        ]
        report(setup, batched, backfill, problems)
        if args.cprofile:
            print(f"\ncProfile of the batched task's execute ({args.cprofile}), top functions by own time:")
            pstats.Stats(args.cprofile).sort_stats("tottime").print_stats(25)
        return 1 if problems else 0

    return exit_status(run, scratch)


if __name__ == "__main__":
    sys.exit(main())
