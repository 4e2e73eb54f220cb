"""Under a real scheduler (LocalExecutor): permanent errors end after one try even with retries=3."""

from __future__ import annotations

import textwrap

import pytest

from airflow_selfheal.engine.sources import sql_engine
from tests.airflow_harness import AirflowServer

DAG_ID = "selfheal_retry_policy_real"
DAG_SOURCE = textwrap.dedent(
    """
    import datetime as dt

    from airflow.sdk import DAG, task

    from airflow_selfheal.healing.retry_policy import TransientOnlyRetryPolicy
    from airflow_selfheal.operators.interval_transfer import SqlIntervalTransferOperator

    POLICY = TransientOnlyRetryPolicy(initial_delay=0.5, max_delay=1.0)

    # An hourly schedule: the interval operator refuses DAGs whose runs have no data window.
    with DAG(dag_id="DAG_ID", schedule="@hourly", start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
             catchup=False) as dag:

        @task(retries=3, retry_delay=dt.timedelta(hours=1), retry_policy=POLICY)
        def permanent_bug():
            raise KeyError("amount")  # a bug: retrying cannot help

        @task(retries=3, retry_delay=dt.timedelta(hours=1), retry_policy=POLICY)
        def transient_blip(ti=None):
            if ti.try_number < 3:
                raise ConnectionResetError("upstream reset the connection")
            return ti.try_number

        # Our own operator fails permanent batch errors at once, whatever retries say.
        broken_query = SqlIntervalTransferOperator(
            task_id="broken_query",
            retries=3,
            retry_delay=dt.timedelta(seconds=1),
            source_conn_id="selfheal_test_postgres",
            sql="SELECT id FROM a_table_that_does_not_exist WHERE ts >= :interval_start",
            destination_conn_id="selfheal_test_postgres",
            destination_table="nowhere",
            interval_column="interval_start",
            selfheal_conn_id="selfheal_test_postgres",
            table_prefix="retrypolicy_",
            pipeline="broken",
        )

        # A transform with a bug fails every record: the ceiling stops the interval, no retry burned.
        @task.selfheal(
            retries=3,
            retry_delay=dt.timedelta(seconds=1),
            destination_conn_id="selfheal_test_postgres",
            destination_table="retrypolicy_orders",
            interval_column="interval_start",
            selfheal_conn_id="selfheal_test_postgres",
            table_prefix="retrypolicy_",
            pipeline="buggy_transform",
            transform=lambda record: record["amount"] / record["quantity"],
        )
        def buggy_transform(interval):
            return [{"amount": 10, "quantity": 0} for _ in range(20)]

        permanent_bug()
        transient_blip()
        buggy_transform()
    """
).replace("DAG_ID", DAG_ID)


@pytest.mark.airflow_server
def test_permanent_errors_burn_no_retries_and_transient_ones_are_retried(airflow_server: AirflowServer) -> None:
    with sql_engine("selfheal_test_postgres").begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS retrypolicy_orders (interval_start timestamp, amount float, quantity int)"
        )
    airflow_server.write_dag(f"{DAG_ID}.py", DAG_SOURCE)
    run_id = airflow_server.trigger(DAG_ID, logical_date="2026-01-01T01:00:00+00:00")
    airflow_server.wait_for_run(DAG_ID, run_id, timeout=180)
    tis = {t["task_id"]: (t["state"], t["try_number"]) for t in airflow_server.task_instances(DAG_ID, run_id)}
    assert tis["permanent_bug"] == ("failed", 1), tis
    assert tis["transient_blip"] == ("success", 3), tis
    assert tis["broken_query"] == ("failed", 1), tis
    assert tis["buggy_transform"] == ("failed", 1), tis
    assert "a bug is likely" in airflow_server.task_log(DAG_ID, run_id, "buggy_transform")
    with sql_engine("selfheal_test_postgres").connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM retrypolicy_orders").scalar() == 0, "nothing committed"
    log = airflow_server.task_log(DAG_ID, run_id, "broken_query")
    assert "not retried" in log
    with sql_engine("selfheal_test_postgres").begin() as conn:
        conn.exec_driver_sql("DROP TABLE retrypolicy_orders")
