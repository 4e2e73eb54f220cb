"""
Shared pieces of the benchmarks: one real Airflow stack at a time, PostgreSQL tables that are always
dropped, DAG files, and REST helpers that page past the API's 100-row limit.

The stack is tests/airflow_harness.py's :func:`~tests.airflow_harness.airflow_stack` (the same code
path as the ``airflow_server`` fixture); run the benchmarks from the repository root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from airflow_selfheal.store.identifiers import validate_identifier
from airflow_selfheal.store.schema import state_tables
from tests.airflow_harness import AirflowServer, AirflowServerError, airflow_stack

BENCH_CONN_ID = "selfheal_bench_postgres"
POSTGRES_URL = os.environ.get("SELFHEAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
HOUR = dt.timedelta(hours=1)
TERMINAL = ("success", "failed")
SOURCE_COLUMNS = "id, ts, customer_id, amount_cents, status"


class CorrectnessError(AssertionError):
    """A benchmark produced wrong data: the only failure that makes a benchmark exit non-zero."""


def exit_status(measure: Callable[[], int], scratch: Scratch) -> int:
    """
    Run a benchmark's ``measure`` and return the process exit status; the scratch tables always go.

    0: measured (or whatever ``measure`` returns), 1: wrong data (:class:`CorrectnessError`),
    2: could not measure (the Airflow stack failed), which is not a correctness failure.
    """
    try:
        return measure()
    except CorrectnessError as error:
        print(f"CORRECTNESS FAILURE: {error}", file=sys.stderr)
        return 1
    except AirflowServerError as error:
        print(f"could not complete the measurement (not a correctness failure): {error}", file=sys.stderr)
        return 2
    finally:
        scratch.drop()
        scratch.engine.dispose()
        say("benchmark tables and state tables dropped")


def say(message: str) -> None:
    """A progress line with the wall-clock time, flushed at once (the benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for_free_machine(poll_seconds: float = 30.0) -> None:
    """Only one Airflow stack may run on this machine: wait while someone else's scheduler runs."""
    while True:
        found = subprocess.run(["pgrep", "-f", "airflow scheduler"], capture_output=True, text=True, check=False)
        pids = found.stdout.split()
        if not pids:
            return
        say(f"another Airflow scheduler is running (pids {' '.join(pids)}); checking again in {poll_seconds:.0f} s")
        time.sleep(poll_seconds)


@contextlib.contextmanager
def running_airflow() -> Iterator[AirflowServer]:
    """A real Airflow stack whose tasks (and this process) reach PostgreSQL as :data:`BENCH_CONN_ID`."""
    wait_for_free_machine()
    os.environ[f"AIRFLOW_CONN_{BENCH_CONN_ID.upper()}"] = POSTGRES_URL  # copied into the stack's environment
    say("starting Airflow (api-server, scheduler, dag-processor, triggerer) on a fresh PostgreSQL metadata DB")
    with airflow_stack() as server:
        say(f"Airflow healthy after {server.startup_seconds:.0f} s at {server.base_url}")
        yield server
    say("Airflow stopped, metadata database dropped")


def pg_engine() -> sa.Engine:
    """An engine on the benchmark database, through psycopg 3 (the driver whose COPY the engine uses)."""
    return sa.create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))


class Scratch:
    """Tables and state-table prefixes a benchmark creates; :meth:`drop` removes every one of them."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.tables: list[str] = []
        self.prefixes: list[str] = []

    def table(self, name: str) -> str:
        self.tables.append(validate_identifier(name, argument="table"))
        return name

    def prefix(self, prefix: str) -> str:
        self.prefixes.append(prefix)
        return prefix

    def drop(self) -> None:
        with self.engine.begin() as conn:
            for name in reversed(self.tables):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
            for prefix in self.prefixes:
                state_tables(prefix).metadata.drop_all(conn, checkfirst=True)


def create_source(engine: sa.Engine, table: str, t0: dt.datetime, hours: int, rows_per_hour: int) -> None:
    """``rows_per_hour`` orders in each of ``hours`` hours from ``t0`` (ids ``hour * 1_000_000 + i``)."""
    step = 3600.0 / rows_per_hour
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, ts timestamp NOT NULL, customer_id integer, "
            "amount_cents integer, status text)"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {table} SELECT h::bigint * 1000000 + i, timestamp '{naive(t0)}' "
            f"+ h * interval '1 hour' + i * interval '{step} second', "
            "mod(h * 7919 + i, 5003), mod(i * 37, 100000), (ARRAY['paid','open','refunded'])[mod(i, 3) + 1] "
            f"FROM generate_series(0, {hours - 1}) AS h, generate_series(0, {rows_per_hour - 1}) AS i"
        )
        conn.exec_driver_sql(f"CREATE INDEX ON {table} (ts)")
        conn.exec_driver_sql(f"ANALYZE {table}")


def create_destination(engine: sa.Engine, table: str) -> None:
    """Same columns as the source, no key (a duplicate would show), indexed on ts like a real fact table."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id bigint, ts timestamp, customer_id integer, amount_cents integer, status text)"
        )
        conn.exec_driver_sql(f"CREATE INDEX ON {table} (ts)")


def check_destination(
    engine: sa.Engine, destination: str, source: str, windows: Sequence[tuple[dt.datetime, dt.datetime]]
) -> list[str]:
    """
    Compare ``destination`` with the source rows of ``windows``: same rows, each exactly once.

    :returns: the problems found (empty when the destination is exact).
    """
    problems: list[str] = []
    merged: list[list[dt.datetime]] = []
    for start, end in sorted(windows):
        if merged and merged[-1][1] == start:
            merged[-1][1] = end  # contiguous: one range keeps the query short
        else:
            merged.append([start, end])
    bounds = " OR ".join(f"(ts >= '{naive(a)}' AND ts < '{naive(b)}')" for a, b in merged) or "false"
    with engine.connect() as conn:
        expected = conn.exec_driver_sql(f"SELECT count(*) FROM {source} WHERE {bounds}").scalar_one()
        total, distinct = conn.exec_driver_sql(f"SELECT count(*), count(DISTINCT id) FROM {destination}").one()
        differ = conn.exec_driver_sql(
            f"SELECT count(*) FROM (SELECT {SOURCE_COLUMNS} FROM {source} WHERE {bounds} "
            f"EXCEPT SELECT {SOURCE_COLUMNS} FROM {destination}) AS missing"
        ).scalar_one()
    if total != expected:
        problems.append(f"{destination} holds {total} rows, expected {expected}")
    if distinct != total:
        problems.append(f"{destination} holds {total - distinct} duplicate rows")
    if differ:
        problems.append(f"{differ} source rows are missing from {destination} or differ there")
    return problems


def naive(moment: dt.datetime) -> str:
    """A UTC moment as PostgreSQL ``timestamp`` text (the source stores naive UTC)."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat()


# -- DAG files ------------------------------------------------------------------------------------

_DAG_TEMPLATE = '''
"""Written by benchmarks/; deleted with the stack."""
import cProfile
import datetime

from airflow.sdk import DAG
from airflow_selfheal.operators.interval_transfer import SqlIntervalTransferOperator

PROFILE_TO = {profile_to!r}  # a path: cProfile execute and write the stats there (benchmark --cprofile)


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class MeasuredTransfer(SqlIntervalTransferOperator):
    """The transfer operator, also reporting the task process's memory during execute."""

    def execute(self, context):
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM: the peak then covers this execute only
        except OSError:
            pass
        start_kb = _status_kb("VmRSS")
        if PROFILE_TO:
            profiler = cProfile.Profile()
            result = profiler.runcall(super().execute, context)
            profiler.dump_stats(PROFILE_TO)
        else:
            result = super().execute(context)
        result["rss_start_kb"] = start_kb
        result["peak_rss_kb"] = _status_kb("VmHWM")
        return result


with DAG(
    dag_id={dag_id!r},
    schedule="@hourly",
    start_date={start!r},
    end_date={end!r},  # no scheduler-made runs: every run is one the benchmark asked for
    catchup=False,
    max_active_runs={max_active_runs!r},
) as dag:
    MeasuredTransfer(
        task_id="load",
        source_conn_id={conn!r},
        sql="SELECT {columns} FROM {source} WHERE ts >= :interval_start AND ts < :interval_end",
        destination_conn_id={conn!r},
        destination_table={destination!r},
        timestamp_column="ts",
        selfheal_conn_id={conn!r},
{extra}    )
'''


def dag_file(
    *,
    dag_id: str,
    source: str,
    destination: str,
    start: dt.datetime,
    end: dt.datetime,
    max_active_runs: int = 16,
    task_kwargs: Mapping[str, Any],
    profile_to: str | None = None,
) -> str:
    """
    The source of a DAG with one ``MeasuredTransfer`` task; ``task_kwargs`` must have Python reprs.

    :param profile_to: run the task's ``execute`` under cProfile and write the stats to this path.
    """
    extra = "".join(f"        {key}={value!r},\n" for key, value in task_kwargs.items())
    return _DAG_TEMPLATE.format(
        dag_id=dag_id,
        start=start,
        end=end,
        max_active_runs=max_active_runs,
        profile_to=profile_to,
        conn=BENCH_CONN_ID,
        columns=SOURCE_COLUMNS,
        source=source,
        destination=destination,
        extra=extra,
    ).lstrip()


def write_dags(server: AirflowServer, files: Mapping[str, str]) -> None:
    """Write DAG files, parse them all with one ``airflow dags reserialize``, fail on import errors."""
    for name, text in files.items():
        (server.dags_folder / name).write_text(textwrap.dedent(text))
    server.cli("dags", "reserialize", timeout=180)
    errors = server.api("GET", "/importErrors", params={"limit": 100}).get("import_errors", [])
    mine = [e for e in errors if Path(str(e.get("filename", ""))).name in files]
    if mine:
        raise AirflowServerError(f"DAG import error:\n{mine[0].get('stack_trace')}")


# -- REST ---------------------------------------------------------------------------------------


def parse_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def all_runs(server: AirflowServer, dag_id: str, **filters: Any) -> list[dict[str, Any]]:
    """Every run of ``dag_id`` matching ``filters`` (e.g. ``run_type="backfill"``), paging by 100."""
    found: list[dict[str, Any]] = []
    while True:
        page = server.api("GET", f"/dags/{dag_id}/dagRuns", params={**filters, "limit": 100, "offset": len(found)})[
            "dag_runs"
        ]
        found.extend(page)
        if len(page) < 100:
            return found


def count_runs(server: AirflowServer, dag_id: str, **filters: Any) -> int:
    """How many runs match ``filters`` (``state`` may be a list) without fetching them."""
    return int(server.api("GET", f"/dags/{dag_id}/dagRuns", params={**filters, "limit": 1})["total_entries"])


def wait_for_count(
    server: AirflowServer, dag_id: str, count: int, *, timeout: float, what: str, **filters: Any
) -> None:
    """Poll until ``count`` runs match ``filters``; raises with the log tails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while (have := count_runs(server, dag_id, **filters)) < count:
        if time.monotonic() > deadline:
            raise AirflowServerError(f"{what}: {have} of {count} after {timeout:.0f} s\n{server.diagnostics()}")
        if time.monotonic() - last_report > 30:
            say(f"  {what}: {have}/{count}")
            last_report = time.monotonic()
        time.sleep(1.0)


def task_instance(server: AirflowServer, dag_id: str, run_id: str, task_id: str = "load") -> dict[str, Any]:
    return dict(server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"))


def return_value(server: AirflowServer, dag_id: str, run_id: str, task_id: str = "load") -> Any:
    """The task's XCom ``return_value`` as JSON."""
    return server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")[
        "value"
    ]


def seconds(later: str | None, earlier: str | None) -> float:
    """``later - earlier`` in seconds, for two REST timestamps."""
    a, b = parse_time(later), parse_time(earlier)
    if a is None or b is None:
        raise AirflowServerError(f"missing timestamp: {later!r} - {earlier!r}")
    return (a - b).total_seconds()


def describe(values: Iterable[float]) -> str:
    """``median m s, max x s (n samples)``."""
    data = sorted(values)
    if not data:
        return "no samples"
    return f"median {statistics.median(data):.2f} s, max {data[-1]:.2f} s ({len(data)} samples)"
