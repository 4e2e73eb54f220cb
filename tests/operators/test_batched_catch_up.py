"""Batched catch-up and lookback through real Airflow (dag.test): oldest first, each interval its own version."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from airflow.sdk import DAG, task

from airflow_selfheal.engine.sources import sql_engine
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from tests.conftest import database_for

T0 = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def rows_of(interval: Interval) -> Iterator[dict[str, Any]]:
    base = int((interval.start - T0) / HOUR) * 100
    for i in range(10):
        yield {"id": base + i, "ts": (interval.start + dt.timedelta(minutes=i)).replace(tzinfo=None), "v": i}


@pytest.fixture
def setup() -> Iterator[dict[str, str]]:
    db = database_for("postgres")
    suffix = uuid.uuid4().hex[:8]
    names = {"conn": db.conn_id, "table": f"cu_{suffix}", "prefix": f"cu{suffix}_", "dag": f"catch_up_{suffix}"}
    md = sa.MetaData()
    sa.Table(
        names["table"],
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.DateTime),
        sa.Column("v", sa.Integer),
    )
    md.create_all(sql_engine(db.conn_id))
    yield names
    md.drop_all(sql_engine(db.conn_id))
    SelfHealStoreHook(db.conn_id, table_prefix=names["prefix"]).drop_state_tables()


def build(names: dict[str, str], *, max_intervals: int, lookback: int = 0) -> DAG:
    common = {
        "destination_conn_id": names["conn"],
        "destination_table": names["table"],
        "timestamp_column": "ts",
        "selfheal_conn_id": names["conn"],
        "table_prefix": names["prefix"],
        "pipeline": "events",
        "ordered": True,
    }
    with DAG(dag_id=names["dag"], schedule="@hourly", start_date=T0, catchup=False) as dag:

        @task.selfheal(
            task_id="catch_up", catch_up=True, catch_up_max_intervals=max_intervals, priority_weight=1, **common
        )
        def catch_up(interval: Interval) -> Iterator[dict[str, Any]]:
            yield from rows_of(interval)

        @task.selfheal(task_id="realtime", lookback=lookback, on_gap="fail", **common)
        def realtime(interval: Interval) -> Iterator[dict[str, Any]]:
            yield from rows_of(interval)

        catch_up() >> realtime()
    return dag


def test_batched_catch_up_fills_the_past_oldest_first_then_realtime_commits(airflow_db, setup) -> None:
    ledger = CheckpointHook(setup["conn"], table_prefix=setup["prefix"])

    # Ten hours of downtime; one catch-up task may do only four: the ordered real-time run must refuse.
    first = airflow_db.run_dag(build(setup, max_intervals=4), logical_date=T0 + 10 * HOUR)
    assert first.state == "failed"
    done = ledger.entries("events", statuses=["done"])
    assert [e.interval.start for e in done] == [T0 + i * HOUR for i in range(4)], "oldest first"
    assert {e.reason for e in done} == {"catch-up"}

    second = airflow_db.run_dag(build(setup, max_intervals=50, lookback=2), logical_date=T0 + 10 * HOUR)
    assert second.state == "success"
    assert ledger.watermark("events") == T0 + 10 * HOUR
    with sql_engine(setup["conn"]).connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*), count(DISTINCT id) FROM {setup['table']}").one() == (100, 100)
    # lookback=2 reprocessed the two intervals before the real-time one as new versions.
    for hour in (7, 8):
        interval = Interval(T0 + hour * HOUR, T0 + (hour + 1) * HOUR)
        assert [v.reason for v in ledger.versions("events", interval)] == ["catch-up", "lookback"]
    assert [v.reason for v in ledger.versions("events", Interval(T0 + 9 * HOUR, T0 + 10 * HOUR))] == ["manual"]


def test_batched_catch_up_respects_an_open_circuit_breaker(airflow_db, setup) -> None:
    from airflow_selfheal.breaker import CircuitBreaker

    calls = {"n": 0}
    breaker = CircuitBreaker(
        f"catch_up_{setup['prefix']}",
        failure_threshold=2,
        when_open="skip",
        selfheal_conn_id=setup["conn"],
        table_prefix=setup["prefix"],
    )
    with DAG(dag_id=f"{setup['dag']}_breaker", schedule="@hourly", start_date=T0, catchup=False) as dag:

        @task.selfheal(
            task_id="catch_up",
            catch_up=True,
            circuit_breaker=breaker,
            pipeline="guarded",
            destination_conn_id=setup["conn"],
            destination_table=setup["table"],
            timestamp_column="ts",
            selfheal_conn_id=setup["conn"],
            table_prefix=setup["prefix"],
        )
        def catch_up(interval: Interval) -> Iterator[dict[str, Any]]:
            calls["n"] += 1
            yield from rows_of(interval)

        catch_up()

    breaker.force_open()
    run = airflow_db.run_dag(dag, logical_date=T0 + 5 * HOUR)
    ti = run.get_task_instance("catch_up")
    assert ti is not None and ti.state == "skipped"
    assert calls["n"] == 0, "an open breaker keeps catch-up away from the dependency"
    assert CheckpointHook(setup["conn"], table_prefix=setup["prefix"]).entries("guarded") == []

    breaker.reset()
    run = airflow_db.run_dag(dag, logical_date=T0 + 5 * HOUR)
    assert run.state == "success"
    assert len(CheckpointHook(setup["conn"], table_prefix=setup["prefix"]).entries("guarded", statuses=["done"])) == 4
