"""
Airflow's own backfill (``airflow backfill create``) over 48 hourly intervals, some done, some failed
(with half-written rows left behind), some missing: the destination ends complete and duplicate-free.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from airflow_selfheal.engine.engine import IntervalEngine
from airflow_selfheal.engine.models import EngineSettings, RunContext
from airflow_selfheal.engine.sinks import SinkSpec
from airflow_selfheal.engine.sources import CallableSource, sql_engine
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from tests.airflow_harness import AirflowServer
from tests.conftest import database_for

T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
HOURS = 48
PER_HOUR = 20
CONN = "selfheal_test_postgres"


def source_rows() -> list[dict[str, Any]]:
    return [
        {"id": h * 100 + i, "ts": (T0 + h * HOUR + dt.timedelta(minutes=3 * i)).replace(tzinfo=None), "amount": i}
        for h in range(HOURS)
        for i in range(PER_HOUR)
    ]


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    database_for("postgres")
    suffix = uuid.uuid4().hex[:8]
    names = {"src": f"bf_src_{suffix}", "dest": f"bf_dest_{suffix}", "prefix": f"bf{suffix}_", "dag": f"bf_{suffix}"}
    md = sa.MetaData()
    src = sa.Table(
        names["src"],
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.DateTime),
        sa.Column("amount", sa.Integer),
    )
    sa.Table(
        names["dest"], md, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("amount", sa.Integer)
    )  # no key on purpose: duplicates would show
    engine = sql_engine(CONN)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(src), source_rows())
    yield names
    md.drop_all(engine)
    SelfHealStoreHook(CONN, table_prefix=names["prefix"]).drop_state_tables()


def dag_source(names: dict[str, str], *, broken_hours: str | None = None) -> str:
    """The DAG under test; with ``broken_hours`` (a table of interval starts) those hours fail on a division by zero."""
    guard = (
        f" AND 1 / (1 - (SELECT count(*) FROM {broken_hours} b WHERE b.interval_start = :interval_start)) = 1"
        if broken_hours
        else ""
    )
    return textwrap.dedent(
        f'''
        import datetime as dt
        from airflow.sdk import DAG
        from airflow_selfheal.operators.interval_transfer import SqlIntervalTransferOperator

        with DAG(dag_id="{names["dag"]}", schedule="@hourly", start_date=dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
                 catchup=False, max_active_runs=4) as dag:
            SqlIntervalTransferOperator(
                task_id="load",
                source_conn_id="{CONN}",
                sql="SELECT id, ts, amount FROM {names["src"]} "
                    "WHERE ts >= :interval_start AND ts < :interval_end{guard}",
                destination_conn_id="{CONN}",
                destination_table="{names["dest"]}",
                timestamp_column="ts",
                selfheal_conn_id="{CONN}",
                table_prefix="{names["prefix"]}",
                pipeline="orders",
            )
        '''
    )


def seed_history(names: dict[str, str]) -> None:
    """Hours 0-15 done, 16-23 failed after writing half their rows, 24-47 never run."""
    rows = source_rows()
    engine = IntervalEngine(
        settings=EngineSettings(pipeline="orders"),
        source=CallableSource(
            lambda interval: [r for r in rows if interval.start <= r["ts"].replace(tzinfo=dt.UTC) < interval.end]
        ),
        sink=SinkSpec(table=names["dest"], timestamp_column="ts"),
        destination_conn_id=CONN,
        selfheal_conn_id=CONN,
        table_prefix=names["prefix"],
    )
    ledger = CheckpointHook(CONN, table_prefix=names["prefix"])
    for hour in range(16):
        engine.run(Interval(T0 + hour * HOUR, T0 + (hour + 1) * HOUR), RunContext(reason="scheduled"))
    with sql_engine(CONN).begin() as conn:
        for hour in range(16, 24):
            interval = Interval(T0 + hour * HOUR, T0 + (hour + 1) * HOUR)
            claim = ledger.try_claim("orders", interval)
            assert claim is not None
            ledger.fail(claim, error="worker lost")
            half = [r for r in rows if interval.start <= r["ts"].replace(tzinfo=dt.UTC) < interval.end][:10]
            conn.execute(
                sa.insert(sa.table(names["dest"], sa.column("id"), sa.column("ts"), sa.column("amount"))), half
            )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def destination(names: dict[str, str]) -> list[tuple[int, int]]:
    with sql_engine(CONN).connect() as conn:
        return sorted(tuple(r) for r in conn.exec_driver_sql(f"SELECT id, amount FROM {names['dest']}"))


def backfill(
    airflow_server: AirflowServer,
    dag_id: str,
    first: dt.datetime,
    last: dt.datetime,
    behavior: str,
    *,
    max_active_runs: int = 4,
) -> None:
    """``airflow backfill create`` over the logical dates ``first`` .. ``last``."""
    airflow_server.cli(
        "backfill",
        "create",
        "--dag-id",
        dag_id,
        "--from-date",
        first.isoformat(),
        "--to-date",
        last.isoformat(),
        "--reprocess-behavior",
        behavior,
        "--max-active-runs",
        str(max_active_runs),
    )


def backfills_completed(airflow_server: AirflowServer, dag_id: str) -> bool:
    backfills = airflow_server.api("GET", "/backfills", params={"dag_id": dag_id})["backfills"]
    return all(b["completed_at"] for b in backfills)


@pytest.mark.airflow_server
def test_airflow_backfill_heals_done_failed_and_missing_intervals(airflow_server: AirflowServer, names) -> None:
    seed_history(names)
    airflow_server.write_dag(f"{names['dag']}.py", dag_source(names))
    expected = sorted((r["id"], r["amount"]) for r in source_rows())

    # @hourly runs process the hour before their logical date: logical dates 01:00 .. +48h cover all 48 hours.
    first, last = T0 + HOUR, T0 + HOURS * HOUR
    backfill(airflow_server, names["dag"], first, last, "none")
    states = airflow_server.wait_for_runs(names["dag"], count=HOURS, run_type="backfill", timeout=420)
    assert set(states.values()) == {"success"}, states
    assert destination(names) == expected, "backfill must leave exactly one copy of every row"

    ledger = CheckpointHook(CONN, table_prefix=names["prefix"])
    window = [Interval(T0 + h * HOUR, T0 + (h + 1) * HOUR) for h in range(HOURS)]
    entries = {e.interval: e for e in ledger.entries("orders")}
    assert all(entries[iv].status == "done" and entries[iv].reason == "backfill" for iv in window)
    assert ledger.watermark("orders", origin=T0) == last
    assert [v.reason for v in ledger.versions("orders", window[0])] == ["scheduled", "backfill"]

    # Reprocess the first 12 hours again ("completed"), several runs at once: still no duplicates.
    # Airflow allows one running backfill per DAG; the scheduler closes the first one shortly after its runs.
    wait_until(lambda: backfills_completed(airflow_server, names["dag"]), "first backfill to complete")
    backfill(airflow_server, names["dag"], first, T0 + 12 * HOUR, "completed", max_active_runs=3)
    airflow_server.wait_for_runs(names["dag"], count=HOURS, run_type="backfill", timeout=240)
    wait_until(lambda: all(len(ledger.versions("orders", iv)) == 3 for iv in window[:12]), "12 reprocessed hours")
    assert destination(names) == expected
    checksums = {v.checksum for v in ledger.versions("orders", window[0])}
    assert len(checksums) == 1, "the same data must give the same checksum in every version"


@pytest.mark.airflow_server
def test_backfill_reprocessing_failed_runs_heals_them_and_leaves_good_hours_alone(
    airflow_server: AirflowServer, names
) -> None:
    """
    ``reprocess_behavior=failed``: an upstream bug fails hours 4-7 of a first backfill; once it is
    fixed, a second backfill over hours 0-15 reruns exactly the failed runs and creates the missing
    ones, and the hours that succeeded keep their single version.
    """
    broken = f"{names['src']}_broken"
    engine = sql_engine(CONN)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {broken} (interval_start timestamptz PRIMARY KEY)")
        for hour in range(4, 8):
            conn.execute(sa.text(f"INSERT INTO {broken} VALUES (:start)"), {"start": T0 + hour * HOUR})
    try:
        airflow_server.write_dag(f"{names['dag']}.py", dag_source(names, broken_hours=broken))
        # Logical dates T0+1h .. T0+12h are the runs of hours 0-11 (an @hourly run processes the hour before it).
        backfill(airflow_server, names["dag"], T0 + HOUR, T0 + 12 * HOUR, "none")
        states = airflow_server.wait_for_runs(names["dag"], count=12, run_type="backfill", timeout=300)
        assert sorted(states.values()).count("failed") == 4, states

        ledger = CheckpointHook(CONN, table_prefix=names["prefix"])
        window = [Interval(T0 + h * HOUR, T0 + (h + 1) * HOUR) for h in range(16)]
        entries = {e.interval: e for e in ledger.entries("orders")}
        assert [h for h in range(12) if entries[window[h]].status == "failed"] == [4, 5, 6, 7]
        assert "division by zero" in (entries[window[4]].error or ""), entries[window[4]].error

        with engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM {broken}")  # the upstream fix
        wait_until(lambda: backfills_completed(airflow_server, names["dag"]), "first backfill to complete")
        backfill(airflow_server, names["dag"], T0 + HOUR, T0 + 16 * HOUR, "failed")
        states = airflow_server.wait_for_runs(names["dag"], count=16, run_type="backfill", timeout=300)
        assert set(states.values()) == {"success"}, states

        expected = sorted((r["id"], r["amount"]) for r in source_rows() if r["id"] < 16 * 100)
        assert destination(names) == expected, "every hour 0-15 exactly once"
        versions = {h: [v.reason for v in ledger.versions("orders", window[h])] for h in range(16)}
        assert all(reasons == ["backfill"] for reasons in versions.values()), (
            "failed hours get their first version from the second backfill; hours that had succeeded "
            f"are not rerun by reprocess_behavior=failed: {versions}"
        )
        assert ledger.watermark("orders", origin=T0) == T0 + 16 * HOUR
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {broken}")
