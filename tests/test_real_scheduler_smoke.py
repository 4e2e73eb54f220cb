"""Smoke tests: task code reaches the state store under dag.test() and under a real scheduler."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest

from airflow_selfheal.hooks.airflow_api import AirflowApiHook
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from tests.airflow_harness import AirflowDb, AirflowServer
from tests.conftest import CONN_IDS, Database

HOUR = dt.timedelta(hours=1)
LOGICAL_DATE = dt.datetime(2026, 3, 1, 5, tzinfo=dt.UTC)


def test_dag_test_claims_and_commits_an_interval(airflow_db: AirflowDb, database: Database, table_prefix: str) -> None:
    from airflow.sdk import DAG, DeltaDataIntervalTimetable, task

    conn_id = database.conn_id

    with DAG(
        f"selfheal_smoke_{database.name}",
        schedule=DeltaDataIntervalTimetable(HOUR),
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
    ) as dag:

        @task
        def load(
            data_interval_start: dt.datetime | None = None,
            data_interval_end: dt.datetime | None = None,
            run_id: str | None = None,
            ti: Any = None,
        ) -> int:
            ledger = CheckpointHook(conn_id, table_prefix=table_prefix)
            assert data_interval_start is not None and data_interval_end is not None  # injected from the context
            interval = Interval(data_interval_start, data_interval_end)
            claim = ledger.try_claim("orders", interval, run_id=run_id, try_number=ti.try_number)
            assert claim is not None
            return ledger.commit(claim, reason="scheduled", rows_read=3, rows_written=3)

        load()

    run = airflow_db.run_dag(dag, logical_date=LOGICAL_DATE)

    assert run.state == "success"
    # A manual run of an hourly delta timetable covers the hour before its logical date.
    entry = CheckpointHook(conn_id, table_prefix=table_prefix).get(
        "orders", Interval(LOGICAL_DATE - HOUR, LOGICAL_DATE)
    )
    assert entry is not None, "the task's commit is not in the ledger"
    assert (entry.status, entry.version, entry.rows_written) == ("done", 1, 3)
    assert (entry.run_id, entry.try_number) == (run.run_id, 1)


SMOKE_DAG = """
from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG, task

from airflow_selfheal.hooks.airflow_api import AirflowApiHook
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.intervals import Interval

# schedule=None: the scheduler creates no runs of its own, only the one the test triggers.
with DAG("{dag_id}", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)):

    @task
    def load(data_interval_start=None, data_interval_end=None, run_id=None, ti=None):
        ledger = CheckpointHook("{conn_id}", table_prefix="{prefix}")
        interval = Interval(data_interval_start, data_interval_end)
        claim = ledger.try_claim("orders", interval, run_id=run_id, try_number=ti.try_number)
        if claim is None:
            raise RuntimeError(f"{{interval}} was claimed by someone else")
        return ledger.commit(claim, reason="scheduled", rows_read=5, rows_written=4, rows_dead_lettered=1)

    @task
    def ask_airflow():
        # The REST connection reaches tasks too: they may not open the metadata database.
        dag = AirflowApiHook("{api_conn_id}").request("GET", "/dags/{dag_id}")
        if dag["is_paused"]:
            raise RuntimeError("the DAG should be running unpaused")

    load()
    ask_airflow()
"""


@pytest.mark.airflow_server
def test_real_scheduler_task_commits_to_postgres_store(airflow_server: AirflowServer, airflow_api_conn_id: str) -> None:
    conn_id = CONN_IDS["postgres"]
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    dag_id = f"selfheal_real_smoke_{prefix.rstrip('_')}"
    try:
        started = time.monotonic()
        airflow_server.write_dag(
            f"{dag_id}.py",
            SMOKE_DAG.format(dag_id=dag_id, conn_id=conn_id, prefix=prefix, api_conn_id=airflow_api_conn_id),
        )
        run_id = airflow_server.trigger(
            dag_id, logical_date=LOGICAL_DATE, data_interval=(LOGICAL_DATE - HOUR, LOGICAL_DATE)
        )
        state = airflow_server.wait_for_run(dag_id, run_id, timeout=90)
        print(  # timing, shown with -s
            f"airflow_server start {airflow_server.startup_seconds:.1f}s, smoke run {time.monotonic() - started:.1f}s"
        )

        tis = airflow_server.task_instances(dag_id, run_id)
        logs = "\n".join(airflow_server.task_log(dag_id, run_id, t["task_id"]) for t in tis if t["state"] != "success")
        assert state == "success", f"{tis}\n{logs}\n{airflow_server.diagnostics()}"
        assert sorted((t["task_id"], t["state"], t["try_number"]) for t in tis) == [
            ("ask_airflow", "success", 1),
            ("load", "success", 1),
        ]
        # The same connection works from the test process.
        runs = AirflowApiHook(airflow_api_conn_id).request("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
        assert [r["dag_run_id"] for r in runs] == [run_id]

        entry = CheckpointHook(conn_id, table_prefix=prefix).get("orders", Interval(LOGICAL_DATE - HOUR, LOGICAL_DATE))
        assert entry is not None, "the task under the real scheduler did not reach the PostgreSQL state store"
        assert (entry.status, entry.version, entry.rows_written, entry.rows_dead_lettered) == ("done", 1, 4, 1)
        assert (entry.run_id, entry.try_number) == (run_id, 1)
    finally:
        SelfHealStoreHook(conn_id, table_prefix=prefix).drop_state_tables()
