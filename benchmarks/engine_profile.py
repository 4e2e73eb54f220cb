"""
Where the batched catch-up's time goes: the interval engine alone, in this process, on the
catch-up speed workload (hourly intervals of 1,000 rows; source, destination and state on PostgreSQL).

Measures, each on the same rows:
- the engine end to end (``run_intervals``, as a catch-up task runs it): rows/s and ms per interval;
- its fixed cost per interval (claim, delete, ledger commit and version) with empty intervals;
- reading the source (``SqlSource`` with a server-side cursor);
- the per-row Python work (``SqlSink.to_row`` and the content checksum);
- the COPY write path (``dialects.bulk_insert``) alone.

No Airflow stack is needed. ``--cprofile`` adds the engine's top functions by own time.
Run from the repository root: ``.venv/bin/python -m benchmarks.engine_profile``.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import datetime as dt
import io
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    BENCH_CONN_ID,
    HOUR,
    POSTGRES_URL,
    SOURCE_COLUMNS,
    Scratch,
    create_destination,
    create_source,
    pg_engine,
    say,
)

# Airflow resolves connections from the environment; keep its home out of the user's ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="selfheal-bench-home-")
    os.environ["AIRFLOW_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ[f"AIRFLOW_CONN_{BENCH_CONN_ID.upper()}"] = POSTGRES_URL


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


COMPONENTS = {
    "source read (SqlSource.chunks)": ("sources.py", "chunks"),
    "to_row (shape, validate, tz)": ("sinks.py", "to_row"),
    "content checksum (per row)": ("models.py", "add"),
    "sink.write (grouping, savepoint)": ("sinks.py", "write"),
    "  of which COPY (bulk_insert)": ("dialects.py", "bulk_insert"),
    "delete interval rows": ("sinks.py", "clear_interval"),
    "ledger claim": ("checkpoint.py", "try_claim"),
    "ledger commit + version": ("engine.py", "_record"),
    "dead-letter count": ("dead_letter.py", "count"),
}


def print_components(profiler: cProfile.Profile) -> None:
    """Cumulative time of the engine's parts, as shares of the profiled catch-up."""
    stats = pstats.Stats(profiler)
    total = max(cum for (_f, _l, name), (_cc, _nc, _tt, cum, _c) in stats.stats.items() if name == "run_intervals")  # type: ignore[attr-defined]
    print(f"cProfile of the same catch-up ({total:.2f} s under the profiler), cumulative time per part:")
    for label, (filename, function) in COMPONENTS.items():
        cum = sum(
            entry[3]
            for (path, _line, name), entry in stats.stats.items()  # type: ignore[attr-defined]
            if name == function and path.endswith(filename)
        )
        print(f"  {label:<34} {cum:6.2f} s  {cum / total:5.1%}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    print("\n".join(out.getvalue().splitlines()[4:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, default=40, help="hourly intervals (default 40)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per interval (default 1000)")
    parser.add_argument("--cprofile", action="store_true", help="also print the engine's top functions")
    args = parser.parse_args(argv)

    from airflow_selfheal.engine.batch import run_intervals
    from airflow_selfheal.engine.engine import IntervalEngine
    from airflow_selfheal.engine.models import Checksum, EngineSettings, RunContext
    from airflow_selfheal.engine.sinks import SinkSpec
    from airflow_selfheal.engine.sources import CallableSource, SqlSource
    from airflow_selfheal.intervals import Interval
    from airflow_selfheal.store import dialects

    logging.getLogger("airflow_selfheal").setLevel(logging.WARNING)  # one summary line per interval is noise here

    suffix = uuid.uuid4().hex[:8]
    engine = pg_engine()
    scratch = Scratch(engine)
    source = scratch.table(f"prof_src_{suffix}")
    prefix = scratch.prefix(f"prof{suffix}_")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    n, rows = args.intervals, args.rows
    windows = [Interval(t0 + h * HOUR, t0 + (h + 1) * HOUR) for h in range(n + 1)]
    sql = f"SELECT {SOURCE_COLUMNS} FROM {source} WHERE ts >= :interval_start AND ts < :interval_end"

    def make_engine(destination: str, pipeline: str, records: Any = None) -> IntervalEngine:
        src: Any = (
            SqlSource(conn_id=BENCH_CONN_ID, render_sql=lambda _i: sql) if records is None else CallableSource(records)
        )
        return IntervalEngine(
            settings=EngineSettings(pipeline=pipeline),
            source=src,
            sink=SinkSpec(table=destination, timestamp_column="ts"),
            destination_conn_id=BENCH_CONN_ID,
            selfheal_conn_id=BENCH_CONN_ID,
            table_prefix=prefix,
        )

    def catch_up(eng: IntervalEngine, intervals: list[Interval]) -> None:
        run_intervals(eng, intervals, context_for=lambda _i: RunContext(reason="catch-up"))

    try:
        say(f"profiling the engine on {n} intervals x {rows} rows (PostgreSQL, {BENCH_CONN_ID})")
        create_source(engine, source, t0, n + 1, rows)
        dests = {name: scratch.table(f"prof_{name}_{suffix}") for name in ("full", "empty", "copy")}
        for name in dests.values():
            create_destination(engine, name)

        # Warm up once (state tables, reflection, connection pool), as a running catch-up task is.
        full = make_engine(dests["full"], "full")
        catch_up(full, windows[:1])
        engine_s = timed(lambda: catch_up(full, windows[1:]))

        empty = make_engine(dests["empty"], "empty", records=lambda interval: [])
        catch_up(empty, windows[:1])
        fixed_s = timed(lambda: catch_up(empty, windows[1:]))

        records: list[Any] = []
        reader = SqlSource(conn_id=BENCH_CONN_ID, render_sql=lambda _i: sql)

        def read() -> None:
            for window in windows[1:]:
                for chunk in reader.chunks(window, 10_000):
                    records.extend(chunk)

        read_s = timed(read)

        sink = full.sink
        with full.destination_engine.connect() as conn:
            table = sink.table(conn)

        def per_row() -> list[dict[str, Any]]:
            checksum = Checksum()
            shaped = []
            for index, record in enumerate(records):
                row = sink.to_row(record, windows[1 + index // rows], table)
                checksum.add(row)
                shaped.append(row)
            return shaped

        started = time.perf_counter()
        shaped = per_row()
        python_s = time.perf_counter() - started

        copy_sink = make_engine(dests["copy"], "copy").sink
        with full.destination_engine.begin() as conn:
            copy_table = copy_sink.table(conn)
            copy_s = timed(lambda: dialects.bulk_insert(conn, copy_table, shaped))

        total = len(records)
        print()
        print(f"== interval engine on {n} intervals x {rows} rows (PostgreSQL source, destination, state) ==")
        print(f"engine end to end  : {total / engine_s:9,.0f} rows/s   {engine_s / n * 1000:6.1f} ms per interval")
        print(f"fixed per interval : {fixed_s / n * 1000:6.1f} ms (claim, delete, ledger commit, version; 0 rows)")
        print(f"source read        : {total / read_s:9,.0f} rows/s   {read_s / n * 1000:6.1f} ms per interval")
        print(f"to_row + checksum  : {total / python_s:9,.0f} rows/s   {python_s / n * 1000:6.1f} ms per interval")
        print(f"COPY (bulk_insert) : {total / copy_s:9,.0f} rows/s   {copy_s / n * 1000:6.1f} ms per interval")
        rest = engine_s - fixed_s - read_s - python_s - copy_s
        print(f"unaccounted        : {rest / n * 1000:6.1f} ms per interval (chunking, savepoints, dead-letter checks)")
        if args.cprofile:
            # A second, profiled pass on its own pipeline and destination (the profiler slows Python code
            # more than I/O, so the shares below lean towards Python).
            dest = scratch.table(f"prof_cprofile_{suffix}")
            create_destination(engine, dest)
            profiled = make_engine(dest, "cprofile")
            catch_up(profiled, windows[:1])
            profiler = cProfile.Profile()
            profiler.runcall(catch_up, profiled, windows[1:])
            print_components(profiler)
        return 0
    finally:
        scratch.drop()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
