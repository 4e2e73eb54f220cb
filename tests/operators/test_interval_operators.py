"""
Both ways in, through real Airflow (dag.test): 24 hourly intervals, a source that fails transiently on
a random third of reads, and a known set of poison records.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from airflow.sdk import DAG, task

from airflow_selfheal.engine.sources import sql_engine
from airflow_selfheal.exceptions import TransientError
from airflow_selfheal.healing.retry import RetrySettings
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.interval_transfer import SqlIntervalTransferOperator
from tests.conftest import database_for

START = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
HOURS = 24
PER_HOUR = 30
POISON_IDS = {3, 1017, 1529, 2204, 2229}  # amount_text is not a number
FAST = RetrySettings(max_attempts=12, initial_delay=0.001, max_delay=0.01, budget=60)


def source_rows() -> list[dict[str, Any]]:
    rows = []
    for hour in range(HOURS):
        for i in range(PER_HOUR):
            row_id = hour * 100 + i
            stamp = (START + dt.timedelta(hours=hour, minutes=2 * i)).replace(tzinfo=None)
            rows.append({"id": row_id, "ts": stamp, "amount_text": "bad" if row_id in POISON_IDS else str(row_id % 50)})
    return rows


def to_order(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "ts": record["ts"], "amount": int(record["amount_text"])}


@pytest.fixture
def world() -> Iterator[dict[str, str]]:
    """Source on PostgreSQL (with a gate that fails a third of the reads), destinations and store on PostgreSQL."""
    pg = database_for("postgres")
    suffix = uuid.uuid4().hex[:8]
    names = {
        "source": f"src_{suffix}",
        "sql_dest": f"orders_sql_{suffix}",
        "flow_dest": f"orders_flow_{suffix}",
        "prefix": f"op{suffix}_",
        "gate": f"flaky_gate_{suffix}",
    }
    engine = sql_engine(pg.conn_id)
    md = sa.MetaData()
    src = sa.Table(
        names["source"],
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.DateTime),
        sa.Column("amount_text", sa.String(10)),
    )
    for dest in (names["sql_dest"], names["flow_dest"]):
        sa.Table(
            dest,
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("ts", sa.DateTime),
            sa.Column("amount", sa.Integer, nullable=False),
        )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(src), source_rows())
        # A real PostgreSQL serialization failure (SQLSTATE 40001, transient) on a third of the reads.
        conn.exec_driver_sql(
            f"CREATE FUNCTION {names['gate']}() RETURNS int AS $$ BEGIN IF random() < 0.33 THEN "
            "RAISE EXCEPTION 'source overloaded' USING ERRCODE = '40001'; END IF; RETURN 1; END $$ "
            "LANGUAGE plpgsql VOLATILE"
        )
    yield names
    md.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {names['gate']}()")
    SelfHealStoreHook(pg.conn_id, table_prefix=names["prefix"]).drop_state_tables()


def build_dag(names: dict[str, str], conn_id: str) -> DAG:
    common = {
        "destination_conn_id": conn_id,
        "write_strategy": "replace_interval",
        "timestamp_column": "ts",
        "key_columns": ["id"],
        "selfheal_conn_id": conn_id,
        "table_prefix": names["prefix"],
        "retry": FAST,
        "max_dead_letter_ratio": 0.1,
    }
    with DAG(dag_id=f"selfheal_ops_{names['prefix']}", schedule="@hourly", start_date=START, catchup=False) as dag:
        SqlIntervalTransferOperator(
            task_id="sql_way",
            source_conn_id=conn_id,
            sql=f"WITH gate AS MATERIALIZED (SELECT {names['gate']}() AS ok) "
            f"SELECT id, ts, amount_text FROM {names['source']}, gate "
            "WHERE ts >= :interval_start AND ts < :interval_end",
            transform=to_order,
            destination_table=names["sql_dest"],
            pipeline="sql_way",
            **common,
        )

        @task.selfheal(destination_table=names["flow_dest"], pipeline="flow_way", transform=to_order, **common)
        def flow_way(interval: Interval) -> Iterator[dict[str, Any]]:
            if random.random() < 1 / 3:
                raise TransientError("upstream API timed out")
            for row in source_rows():
                if interval.start <= row["ts"].replace(tzinfo=dt.UTC) < interval.end:
                    yield row

        flow_way()
    return dag


def test_both_ways_in_heal_24_intervals_exactly(airflow_db, world) -> None:
    pg = database_for("postgres")
    dag = build_dag(world, pg.conn_id)
    airflow_db.sync_dag(dag)
    for hour in range(1, HOURS + 1):
        # @hourly is a trigger timetable: empty data intervals, the window is derived from it.
        run = dag.test(logical_date=START + dt.timedelta(hours=hour))
        assert run.state == "success", f"run {hour} ended {run.state}"

    expected = sorted((r["id"], r["amount_text"]) for r in source_rows() if r["id"] not in POISON_IDS)
    ledger = CheckpointHook(pg.conn_id, table_prefix=world["prefix"])
    letters = DeadLetterHook(pg.conn_id, table_prefix=world["prefix"])
    with sql_engine(pg.conn_id).connect() as conn:
        for pipeline, table in (("sql_way", world["sql_dest"]), ("flow_way", world["flow_dest"])):
            rows = sorted((r[0], str(r[1])) for r in conn.exec_driver_sql(f"SELECT id, amount FROM {table}"))
            assert rows == expected, f"{pipeline}: destination is not exactly the good rows"
            assert {x.record_key for x in letters.list_letters(pipeline=pipeline)} == POISON_IDS
            done = ledger.entries(pipeline, statuses=["done"])
            assert len(done) == HOURS
            assert ledger.watermark(pipeline) == START + dt.timedelta(hours=HOURS)
            retries = HealEventHook(pg.conn_id, table_prefix=world["prefix"]).list_events(
                pipeline=pipeline, kind="retry"
            )
            assert retries, f"{pipeline}: the flaky source never failed, so nothing was healed"
