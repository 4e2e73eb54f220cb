from __future__ import annotations

import os
import time
from typing import Any

import pytest

from airflow_selfheal.engine.models import RunContext
from airflow_selfheal.engine.redrive import Redriver, RedriveSettings
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from tests.engine.helpers import create_destination, destination_rows, drop_table, hourly, make_engine, records_for

BROKEN = {"ids": set()}  # ids the transform fails on; the "fix" empties it


def flaky_transform(record: dict[str, Any]) -> dict[str, Any]:
    if record["id"] in BROKEN["ids"]:
        raise ValueError(f"unknown currency in record {record['id']}")
    return record


@pytest.fixture(autouse=True)
def _reset_broken():
    BROKEN["ids"] = set()
    yield
    BROKEN["ids"] = set()


def engine_for(db, prefix: str, table: str, **settings: Any):
    return make_engine(
        store_conn_id=db.conn_id,
        prefix=prefix,
        dest_conn_id=db.conn_id,
        table=table,
        produce=lambda interval: records_for(interval, 50),
        transform=flaky_transform,
        **settings,
    )


@pytest.fixture
def dest(database):
    table = create_destination(database.conn_id)
    yield table
    drop_table(database.conn_id, table)


def test_redrive_after_a_fix_resolves_letters_and_matches_a_clean_run(database, table_prefix, dest) -> None:
    BROKEN["ids"] = {7, 12}
    engine = engine_for(database, table_prefix, dest)
    interval = hourly(1)[0]
    engine.run(interval, RunContext(reason="scheduled"))
    assert len(destination_rows(database.conn_id, dest)) == 48

    BROKEN["ids"] = set()  # the bug is fixed
    summary = Redriver(engine, RedriveSettings()).run(context=RunContext(reason="redrive"))
    assert (summary.claimed, summary.resolved, summary.failed_again) == (2, 2, 0)
    rows = destination_rows(database.conn_id, dest)
    assert [r[0] for r in rows] == list(range(50)), "redriven records written once, nothing else touched"
    letters = DeadLetterHook(database.conn_id, table_prefix=table_prefix).list_letters(pipeline="orders")
    assert {x.status for x in letters} == {"resolved"}
    versions = CheckpointHook(database.conn_id, table_prefix=table_prefix).versions("orders", interval)
    assert [v.reason for v in versions] == ["scheduled", "redrive"]

    # The checksum after redrive equals that of one clean run of the interval.
    clean = engine.run(interval, RunContext(reason="manual"))
    assert versions[1].checksum == clean.checksum

    again = Redriver(engine, RedriveSettings()).run(context=RunContext(reason="redrive"))
    assert again.claimed == 0, "resolved letters are not redriven again"


def test_letters_failing_again_are_parked_and_stay_parked(database, table_prefix, dest) -> None:
    BROKEN["ids"] = {3}
    engine = engine_for(database, table_prefix, dest)
    engine.run(hourly(1)[0])
    redrive = Redriver(engine, RedriveSettings(max_attempts=3))
    first = redrive.run(context=RunContext(reason="redrive"))
    assert (first.failed_again, first.parked) == (1, 0)
    second = redrive.run(context=RunContext(reason="redrive"))
    assert (second.failed_again, second.parked) == (1, 1)
    third = redrive.run(context=RunContext(reason="redrive"))
    assert third.claimed == 0, "a parked letter is not picked up again"
    (letter,) = DeadLetterHook(database.conn_id, table_prefix=table_prefix).list_letters(pipeline="orders")
    assert (letter.status, letter.attempts, letter.error_class) == ("parked", 3, "ValueError")


def test_the_rate_limit_holds(database, table_prefix, dest) -> None:
    BROKEN["ids"] = set(range(30))
    engine = engine_for(database, table_prefix, dest, max_dead_letter_ratio=None)
    engine.run(hourly(1)[0])
    BROKEN["ids"] = set()
    started = time.monotonic()
    summary = Redriver(engine, RedriveSettings(batch_size=5, records_per_second=20)).run(
        context=RunContext(reason="redrive")
    )
    elapsed = time.monotonic() - started
    assert summary.resolved == 30
    # 30 records at 20/s cannot take less than 1.5 s; allow 10 % for timer granularity.
    assert elapsed >= 1.35, f"30 records redriven in {elapsed:.2f}s at a limit of 20/s"


def _redrive_in_child(db_conn_id: str, prefix: str, table: str, out: int) -> None:
    from tests.conftest import Database

    engine = engine_for(Database("x", db_conn_id), prefix, table)
    summary = Redriver(engine, RedriveSettings(batch_size=7)).run(context=RunContext(reason="redrive"))
    os.write(out, f"{summary.resolved}\n".encode())


def test_two_concurrent_redrives_resolve_every_letter_once(server_database, server_table_prefix) -> None:
    db, prefix = server_database, server_table_prefix
    table = create_destination(db.conn_id)
    try:
        BROKEN["ids"] = {i for h in range(4) for i in range(h * 1000, h * 1000 + 50) if i % 2}
        engine = engine_for(db, prefix, table, max_dead_letter_ratio=None)
        for interval in hourly(4):
            engine.run(interval)
        BROKEN["ids"] = set()
        read, write = os.pipe()
        children = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                try:
                    _redrive_in_child(db.conn_id, prefix, table, write)
                finally:
                    os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(write)
        resolved_per_child = [int(x) for x in os.read(read, 1000).decode().split()]
        assert sum(resolved_per_child) == 100, resolved_per_child
        rows = destination_rows(db.conn_id, table)
        assert len(rows) == len({r[0] for r in rows}) == 200, "no duplicates, nothing missing"
        statuses = {x.status for x in DeadLetterHook(db.conn_id, table_prefix=prefix).list_letters(limit=None)}
        assert statuses == {"resolved"}
    finally:
        drop_table(db.conn_id, table)
