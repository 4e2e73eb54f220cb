"""DeadLetterRedriveOperator in a real DAG (dag.test): letters of a fixed bug are resolved through the pipeline."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from airflow.sdk import DAG, task

from airflow_selfheal.engine.sources import sql_engine
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.redrive import DeadLetterRedriveOperator
from tests.conftest import database_for

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
FIXED = {"yes": False}


def parse(record: dict[str, Any]) -> dict[str, Any]:
    if record["id"] % 10 == 3 and not FIXED["yes"]:
        raise ValueError("amount has a thousands separator")
    return record


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    db = database_for("mysql")
    suffix = uuid.uuid4().hex[:8]
    names = {"conn": db.conn_id, "table": f"rd_{suffix}", "prefix": f"rd{suffix}_"}
    md = sa.MetaData()
    sa.Table(
        names["table"],
        md,
        # autoincrement=False: MySQL would turn an explicit id 0 into the next auto value.
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.DateTime),
        sa.Column("amount", sa.Integer),
    )
    md.create_all(sql_engine(db.conn_id))
    yield names
    md.drop_all(sql_engine(db.conn_id))
    SelfHealStoreHook(db.conn_id, table_prefix=names["prefix"]).drop_state_tables()


def test_redrive_operator_resolves_letters_after_the_fix(airflow_db, names) -> None:
    with DAG(dag_id=f"redrive_{names['prefix']}", schedule="@hourly", start_date=T0, catchup=False) as dag:

        @task.selfheal(
            destination_conn_id=names["conn"],
            destination_table=names["table"],
            timestamp_column="ts",
            key_columns=["id"],
            selfheal_conn_id=names["conn"],
            table_prefix=names["prefix"],
            pipeline="amounts",
            transform=parse,
            max_dead_letter_ratio=0.2,
        )
        def load(interval: Interval) -> Iterator[dict[str, Any]]:
            base = interval.start.hour * 100
            for i in range(30):
                stamp = (interval.start + dt.timedelta(minutes=i)).replace(tzinfo=None)
                yield {"id": base + i, "ts": stamp, "amount": i}

        loaded = load()
        loaded >> DeadLetterRedriveOperator(task_id="redrive", pipeline_task=loaded, records_per_second=100)

    FIXED["yes"] = False
    airflow_db.run_dag(dag, logical_date=T0 + dt.timedelta(hours=1))
    letters = DeadLetterHook(names["conn"], table_prefix=names["prefix"])
    assert letters.count(pipeline="amounts", statuses=["pending"]) == 3

    FIXED["yes"] = True  # the fix ships: the next run's redrive resolves the old letters
    run = airflow_db.run_dag(dag, logical_date=T0 + dt.timedelta(hours=2))
    assert run.state == "success"
    assert letters.count(pipeline="amounts", statuses=["resolved"]) == 3
    assert letters.count(pipeline="amounts") == 3
    with sql_engine(names["conn"]).connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {names['table']}").scalar() == 60
