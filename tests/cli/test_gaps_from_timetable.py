"""`airflow selfheal gaps --dag-id`: gaps against the DAG's own timetable, through the real CLI."""

from __future__ import annotations

import datetime as dt
import uuid

from airflow.sdk import DAG
from airflow.sdk.bases.operator import BaseOperator

from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from tests.cli.test_selfheal_cli import as_json, selfheal
from tests.conftest import database_for

T0 = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def test_gaps_follow_the_dags_timetable(airflow_db) -> None:
    db = database_for("sqlite")
    prefix = f"tg{uuid.uuid4().hex[:6]}_"
    dag_id = f"gaps_{prefix}"
    with DAG(dag_id=dag_id, schedule="@hourly", start_date=T0, catchup=False) as dag:
        BaseOperator(task_id="noop")
    airflow_db.sync_dag(dag)
    ledger = CheckpointHook(db.conn_id, table_prefix=prefix)
    try:
        for hour in (0, 1, 3):
            claim = ledger.try_claim("events", Interval(T0 + hour * HOUR, T0 + (hour + 1) * HOUR))
            assert claim is not None
            if hour == 3:
                ledger.fail(claim, error="boom")
            else:
                ledger.commit(claim, reason="scheduled")
        rows = as_json(
            selfheal(
                "gaps",
                "events",
                "--dag-id",
                dag_id,
                "--end",
                (T0 + 5 * HOUR).isoformat(),
                "--conn-id",
                db.conn_id,
                "--table-prefix",
                prefix,
                "-o",
                "json",
            )
        )
        assert [(r["start"], r["status"]) for r in rows] == [
            ((T0 + 2 * HOUR).isoformat(), "missing"),
            ((T0 + 3 * HOUR).isoformat(), "failed"),
            ((T0 + 4 * HOUR).isoformat(), "missing"),
        ]
        unknown = selfheal(
            "gaps", "events", "--dag-id", "no_such_dag", "--conn-id", db.conn_id, "--table-prefix", prefix
        )
        assert unknown.returncode == 1 and "no_such_dag" in unknown.stderr and "Traceback" not in unknown.stderr
    finally:
        SelfHealStoreHook(db.conn_id, table_prefix=prefix).drop_state_tables()
