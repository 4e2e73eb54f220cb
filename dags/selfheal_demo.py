"""
Demo pipeline of airflow-selfheal: hourly orders from a SQL source, plus a flaky exchange-rate feed.

* ``load_orders`` (SqlIntervalTransferOperator): a few orders carry an unparseable amount; they end
  in the dead-letter table while the rest of each hour is written.
* ``load_rates`` (``@task.selfheal``): the feed fails transiently on about a third of the calls; the
  engine retries inside the task with jittered backoff, and each retry is a heal event.

The schedule is ``@hourly``, which in Airflow 3 gives empty data intervals; the operators derive the
real window (previous hour) from the timetable. Run it with ``scripts/demo.sh``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
from collections.abc import Iterator
from typing import Any

from airflow.sdk import DAG, task

from airflow_selfheal.exceptions import TransientError
from airflow_selfheal.healing.retry import RetrySettings
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.interval_transfer import SqlIntervalTransferOperator


def parse_order(record: dict[str, Any]) -> dict[str, Any]:
    """Source amounts are text; a value that is not a number is a poison record."""
    return {"id": record["id"], "ordered_at": record["ordered_at"], "amount": decimal.Decimal(record["amount_text"])}


with DAG(
    dag_id="selfheal_demo",
    schedule="@hourly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    tags=["selfheal", "demo"],
) as dag:
    load_orders = SqlIntervalTransferOperator(
        task_id="load_orders",
        source_conn_id="selfheal_demo_source",
        sql="SELECT id, ordered_at, amount_text FROM raw_orders "
        "WHERE ordered_at >= :interval_start AND ordered_at < :interval_end ORDER BY id",
        transform=parse_order,
        destination_conn_id="selfheal_default",
        destination_table="orders",
        write_strategy="replace_interval",
        timestamp_column="ordered_at",
        key_columns=["id"],
        max_dead_letter_ratio=0.1,
        keep_versions=2,
    )

    @task.selfheal(
        destination_conn_id="selfheal_default",
        destination_table="fx_rates",
        write_strategy="upsert",
        key_columns=["currency", "hour"],
        retry=RetrySettings(max_attempts=8, initial_delay=0.05, max_delay=0.5, budget=30),
    )
    def load_rates(interval: Interval) -> Iterator[dict[str, Any]]:
        """A feed that times out on about a third of the calls."""
        if random.random() < 1 / 3:
            raise TransientError("fx feed timed out")
        hour = interval.start.replace(tzinfo=None)
        for index, currency in enumerate(("EUR", "GBP", "JPY")):
            yield {"currency": currency, "hour": hour, "rate": 1 + index / 10 + hour.hour / 1000}

    load_orders >> load_rates()
