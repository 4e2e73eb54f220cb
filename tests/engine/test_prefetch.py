"""Read-ahead in batched catch-up: every interval read once, in full, and errors still surface in the task."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_selfheal.engine.prefetch import ReadAheadSource, read_ahead
from airflow_selfheal.engine.sources import CallableSource, SqlSource
from airflow_selfheal.intervals import Interval

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
WINDOWS = [Interval(T0 + h * HOUR, T0 + (h + 1) * HOUR) for h in range(4)]


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    """A real SQLite table with ``rows_per_hour`` rows in each of the four hours (12 by default)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE events (id INTEGER PRIMARY KEY, ts TIMESTAMP)")
    insert_hours(engine, range(4), per_hour=12)
    return engine


def insert_hours(engine: sa.Engine, hours: range, *, per_hour: int, first_id: int = 0) -> None:
    rows = [
        {"id": first_id + h * 100 + i, "ts": (T0 + h * HOUR + i * dt.timedelta(minutes=4)).replace(tzinfo=None)}
        for h in hours
        for i in range(per_hour)
    ]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO events (id, ts) VALUES (:id, :ts)"), rows)


class CountingSql:
    """The source query, counting the reads of each interval (and failing where told to)."""

    def __init__(self) -> None:
        self.reads: Counter[dt.datetime] = Counter()
        self.fail_reads: dict[dt.datetime, int] = {}

    def __call__(self, interval: Interval) -> str:
        self.reads[interval.start] += 1
        if self.fail_reads.get(interval.start, 0) >= self.reads[interval.start]:
            return "SELECT id, ts FROM no_such_table"
        return "SELECT id, ts FROM events WHERE ts >= :interval_start AND ts < :interval_end ORDER BY id"


def ids(chunks: list[list[object]]) -> list[int]:
    return [int(record["id"]) for chunk in chunks for record in chunk]  # type: ignore[index]


def expected_ids(interval: Interval, per_hour: int = 12) -> list[int]:
    hour = int((interval.start - T0) / HOUR)
    return [hour * 100 + i for i in range(per_hour)]


def test_each_interval_is_read_once_and_served_whole_in_order(engine: sa.Engine) -> None:
    sql = CountingSql()
    source = SqlSource(conn_id="unused", render_sql=sql, engine=engine)
    with ReadAheadSource(source, WINDOWS, chunk_size=100) as ahead:
        for window in WINDOWS:
            assert ids(list(ahead.chunks(window, 100))) == expected_ids(window)
    assert sql.reads == Counter({w.start: 1 for w in WINDOWS}), "read ahead, never read twice"


def test_an_interval_larger_than_a_chunk_is_read_in_the_task_in_chunks(engine: sa.Engine) -> None:
    sql = CountingSql()
    source = SqlSource(conn_id="unused", render_sql=sql, engine=engine)
    with ReadAheadSource(source, WINDOWS, chunk_size=5) as ahead:
        for window in WINDOWS:
            chunks = list(ahead.chunks(window, 5))
            assert [len(c) for c in chunks] == [5, 5, 2], "memory stays bounded by the chunk size"
            assert ids(chunks) == expected_ids(window)
    # Read-ahead saw a full chunk for the second interval, handed it back and stopped reading ahead.
    assert sum(sql.reads.values()) == len(WINDOWS) + 1


def test_a_failed_read_ahead_is_read_again_in_the_task_and_a_lasting_error_is_raised_there(
    engine: sa.Engine,
) -> None:
    sql = CountingSql()
    sql.fail_reads = {WINDOWS[1].start: 1, WINDOWS[2].start: 99}  # hour 1 fails once, hour 2 keeps failing
    source = SqlSource(conn_id="unused", render_sql=sql, engine=engine)
    with ReadAheadSource(source, WINDOWS, chunk_size=100) as ahead:
        assert ids(list(ahead.chunks(WINDOWS[0], 100))) == expected_ids(WINDOWS[0])
        assert ids(list(ahead.chunks(WINDOWS[1], 100))) == expected_ids(WINDOWS[1])
        with pytest.raises(sa.exc.OperationalError, match="no_such_table"):
            list(ahead.chunks(WINDOWS[2], 100))
        assert ids(list(ahead.chunks(WINDOWS[3], 100))) == expected_ids(WINDOWS[3])
    assert sql.reads[WINDOWS[1].start] == 2


def test_a_retried_interval_is_read_afresh_and_sees_late_rows(engine: sa.Engine) -> None:
    sql = CountingSql()
    source = SqlSource(conn_id="unused", render_sql=sql, engine=engine)
    with ReadAheadSource(source, WINDOWS, chunk_size=100) as ahead:
        list(ahead.chunks(WINDOWS[0], 100))
        assert ids(list(ahead.chunks(WINDOWS[1], 100))) == expected_ids(WINDOWS[1])
        insert_hours(engine, range(1, 2), per_hour=1, first_id=50)  # a late row for hour 1
        retried = ids(list(ahead.chunks(WINDOWS[1], 100)))
    assert retried == [*expected_ids(WINDOWS[1]), 150], "a retry must not be served the stale read-ahead"


def test_only_sql_sources_of_more_than_one_interval_are_read_ahead(engine: sa.Engine) -> None:
    sql_source = SqlSource(conn_id="unused", render_sql=CountingSql(), engine=engine)
    assert read_ahead(CallableSource(lambda interval: []), WINDOWS, chunk_size=10) is None
    assert read_ahead(sql_source, WINDOWS[:1], chunk_size=10) is None
    ahead = read_ahead(sql_source, WINDOWS, chunk_size=10)
    assert isinstance(ahead, ReadAheadSource)
    ahead.close()
