from __future__ import annotations

from typing import Any

import pytest

from airflow_selfheal.engine.models import RunContext
from airflow_selfheal.exceptions import DeadLetterCeilingExceeded, OrderingGapError, TransientError
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.intervals import Interval
from tests.engine.helpers import create_destination, destination_rows, drop_table, hourly, make_engine, records_for


@pytest.fixture
def dest(database):
    table = create_destination(database.conn_id)
    yield table
    drop_table(database.conn_id, table)


def poison_transform(record: dict[str, Any]) -> dict[str, Any]:
    if record["note"] == "r7":
        raise ValueError(f"cannot parse amount of record {record['id']}")
    return record


@pytest.mark.parametrize("strategy", ["replace_interval", "upsert"])
def test_poison_records_go_to_dead_letters_and_the_rest_is_written(database, table_prefix, dest, strategy) -> None:
    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=lambda interval: records_for(interval),
        transform=poison_transform,
        strategy=strategy,
        max_dead_letter_ratio=0.1,
    )
    interval = hourly(1)[0]
    summary = engine.run(interval, RunContext(reason="scheduled", run_id="r1"))
    assert (summary.rows_read, summary.rows_written, summary.rows_dead_lettered) == (20, 19, 1)
    assert [r[0] for r in destination_rows(database.conn_id, dest)] == [i for i in range(20) if i != 7]
    letters = DeadLetterHook(database.conn_id, table_prefix=table_prefix).list_letters(pipeline="orders")
    assert [(x.record_key, x.stage, x.error_class, x.status) for x in letters] == [
        (7, "transform", "ValueError", "pending")
    ]
    assert letters[0].payload["note"] == "r7"
    entry = CheckpointHook(database.conn_id, table_prefix=table_prefix).get("orders", interval)
    assert entry is not None and (entry.status, entry.rows_dead_lettered, entry.version) == ("done", 1, 1)


@pytest.mark.parametrize("strategy", ["replace_interval", "upsert"])
def test_a_batch_the_database_rejects_is_split_until_only_bad_rows_remain(
    database, table_prefix, dest, strategy
) -> None:
    def produce(interval: Interval) -> list[dict[str, Any]]:
        rows = records_for(interval, 40)
        rows[5]["amount"] = None  # NOT NULL violation, found by the database itself
        rows[30]["amount"] = None
        return rows

    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=produce,
        strategy=strategy,
        chunk_size=16,
        max_dead_letter_ratio=0.1,
    )
    summary = engine.run(hourly(1)[0])
    assert (summary.rows_written, summary.rows_dead_lettered) == (38, 2)
    assert len(destination_rows(database.conn_id, dest)) == 38
    letters = DeadLetterHook(database.conn_id, table_prefix=table_prefix).list_letters(pipeline="orders")
    assert sorted(x.record_key for x in letters) == [5, 30]
    assert {x.stage for x in letters} == {"write"}


def test_a_transform_bug_fails_the_interval_without_committing_anything(database, table_prefix, dest) -> None:
    def buggy(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "amount": record["amount_typo"]}

    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=lambda interval: records_for(interval),
        transform=buggy,
    )
    interval = hourly(1)[0]
    with pytest.raises(DeadLetterCeilingExceeded, match="a bug is likely"):
        engine.run(interval)
    assert destination_rows(database.conn_id, dest) == []
    assert DeadLetterHook(database.conn_id, table_prefix=table_prefix).count(pipeline="orders") == 0
    assert CheckpointHook(database.conn_id, table_prefix=table_prefix).get("orders", interval).status == "failed"  # type: ignore[union-attr]
    kinds = [e.kind for e in HealEventHook(database.conn_id, table_prefix=table_prefix).list_events(pipeline="orders")]
    assert "ceiling_exceeded" in kinds


def test_transient_source_failures_are_retried_in_the_task(database, table_prefix, dest) -> None:
    calls = {"n": 0}

    def flaky(interval: Interval) -> list[dict[str, Any]]:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise TransientError("source timed out")
        return records_for(interval)

    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=flaky,
    )
    summary = engine.run(hourly(1)[0])
    assert (summary.retries, summary.rows_written) == (2, 20)
    events = HealEventHook(database.conn_id, table_prefix=table_prefix).list_events(pipeline="orders", kind="retry")
    assert [e.detail["attempt"] for e in events] == [1, 2]


def test_rerun_makes_a_new_version_with_the_same_checksum_and_rollback_restores(database, table_prefix, dest) -> None:
    state = {"bonus": 0}

    def produce(interval: Interval) -> list[dict[str, Any]]:
        return [{**r, "amount": r["amount"] + state["bonus"]} for r in records_for(interval, 5)]

    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=produce,
        keep_versions=2,
    )
    interval = hourly(1)[0]
    first = engine.run(interval, RunContext(reason="scheduled"))
    original = destination_rows(database.conn_id, dest)
    second = engine.run(interval, RunContext(reason="manual"))
    assert (first.version, second.version) == (1, 2)
    assert first.checksum == second.checksum
    assert destination_rows(database.conn_id, dest) == original, "a rerun must not duplicate"

    state["bonus"] = 100  # upstream data changed: version 3 differs
    third = engine.run(interval, RunContext(reason="backfill"))
    assert third.checksum != first.checksum
    assert destination_rows(database.conn_id, dest) != original

    assert engine.rollback(interval, to_version=2) == 4
    assert destination_rows(database.conn_id, dest) == original
    history = CheckpointHook(database.conn_id, table_prefix=table_prefix).versions("orders", interval)
    assert [(v.version, v.reason) for v in history] == [
        (1, "scheduled"),
        (2, "manual"),
        (3, "backfill"),
        (4, "rollback"),
    ]
    assert history[3].checksum == history[1].checksum


def test_ordered_pipeline_refuses_to_commit_ahead_of_a_gap(database, table_prefix, dest) -> None:
    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=lambda interval: records_for(interval, 3),
        ordered=True,
    )
    first, second, third = hourly(3)
    engine.run(first)
    with pytest.raises(OrderingGapError, match=r"2026-03-01T01:00:00\+00:00, 2026-03-01T02:00:00\+00:00"):
        engine.run(third)
    engine.run(second)
    engine.run(third)
    assert CheckpointHook(database.conn_id, table_prefix=table_prefix).watermark("orders") == third.end


def test_a_record_that_later_succeeds_resolves_its_dead_letter(database, table_prefix, dest) -> None:
    fixed = {"yes": False}

    def transform(record: dict[str, Any]) -> dict[str, Any]:
        if record["id"] == 3 and not fixed["yes"]:
            raise KeyError("currency")
        return record

    engine = make_engine(
        store_conn_id=database.conn_id,
        prefix=table_prefix,
        dest_conn_id=database.conn_id,
        table=dest,
        produce=lambda interval: records_for(interval, 30),
        transform=transform,
    )
    engine.run(hourly(1)[0])
    letters = DeadLetterHook(database.conn_id, table_prefix=table_prefix)
    assert [x.status for x in letters.list_letters(pipeline="orders")] == ["pending"]
    fixed["yes"] = True
    engine.run(hourly(1)[0])
    assert [x.status for x in letters.list_letters(pipeline="orders")] == ["resolved"]
    assert len(destination_rows(database.conn_id, dest)) == 30
