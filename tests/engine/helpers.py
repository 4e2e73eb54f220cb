"""Shared pieces of the engine tests: a destination table, a deterministic source, reading results back."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.engine.engine import IntervalEngine
from airflow_selfheal.engine.models import EngineSettings
from airflow_selfheal.engine.sinks import SinkSpec
from airflow_selfheal.engine.sources import CallableSource, sql_engine
from airflow_selfheal.healing.retry import RetrySettings
from airflow_selfheal.intervals import Interval

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
FAST_RETRY = RetrySettings(max_attempts=6, initial_delay=0.001, max_delay=0.01, budget=30)


def hourly(n: int) -> list[Interval]:
    return [Interval(T0 + i * HOUR, T0 + (i + 1) * HOUR) for i in range(n)]


def create_destination(conn_id: str) -> str:
    """A fresh destination table: id key, interval stamp, event time, amount (NOT NULL), note."""
    name = f"dest_{uuid.uuid4().hex[:8]}"
    md = sa.MetaData()
    sa.Table(
        name,
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("interval_start", sa.DateTime, nullable=True),
        sa.Column("event_time", sa.DateTime, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        sa.Column("note", sa.String(50)),
    )
    md.create_all(sql_engine(conn_id))
    return name


def drop_table(conn_id: str, name: str) -> None:
    with sql_engine(conn_id).begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def destination_rows(conn_id: str, table: str) -> list[tuple[Any, ...]]:
    """Rows as (id, amount, note) sorted by id: what a user would compare."""
    with sql_engine(conn_id).connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(f"SELECT id, amount, note FROM {table} ORDER BY id")]


def records_for(interval: Interval, per_interval: int = 20) -> list[dict[str, Any]]:
    """Deterministic records of one interval; ids are unique across intervals."""
    base = int((interval.start - T0) / HOUR) * 1000
    return [
        {"id": base + i, "event_time": interval.start + dt.timedelta(minutes=i % 60), "amount": i, "note": f"r{i}"}
        for i in range(per_interval)
    ]


def make_engine(
    *,
    store_conn_id: str,
    prefix: str,
    dest_conn_id: str,
    table: str,
    produce: Callable[..., Iterator[dict[str, Any]] | list[dict[str, Any]]],
    transform: Callable[[Any], Any] | None = None,
    strategy: str = "replace_interval",
    **settings: Any,
) -> IntervalEngine:
    sink = (
        SinkSpec(table=table, write_strategy="replace_interval", timestamp_column="event_time", key_columns=("id",))
        if strategy == "replace_interval"
        else SinkSpec(table=table, write_strategy="upsert", interval_column="interval_start", key_columns=("id",))
    )
    return IntervalEngine(
        settings=EngineSettings(pipeline=settings.pop("pipeline", "orders"), **settings),
        source=CallableSource(produce),
        sink=sink,
        destination_conn_id=dest_conn_id,
        transform=transform,
        selfheal_conn_id=store_conn_id,
        table_prefix=prefix,
        retry_settings=FAST_RETRY,
    )
