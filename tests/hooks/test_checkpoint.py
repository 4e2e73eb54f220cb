from __future__ import annotations

import datetime as dt

import pytest

from airflow_selfheal.exceptions import ClaimLostError
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.intervals import Interval

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def hourly(n: int, start: dt.datetime = T0) -> list[Interval]:
    return [Interval(start + i * HOUR, start + (i + 1) * HOUR) for i in range(n)]


@pytest.fixture
def ledger(database, table_prefix) -> CheckpointHook:
    return CheckpointHook(database.conn_id, table_prefix=table_prefix)


def test_claim_commit_and_versions(ledger: CheckpointHook) -> None:
    interval = hourly(1)[0]
    claim = ledger.try_claim("orders", interval, run_id="scheduled__1", try_number=1)
    assert claim is not None
    assert ledger.try_claim("orders", interval) is None, "a live claim must not be taken twice"
    assert (
        ledger.commit(claim, reason="scheduled", rows_read=10, rows_written=9, rows_dead_lettered=1, checksum="abc")
        == 1
    )
    entry = ledger.get("orders", interval)
    assert entry is not None
    assert (entry.status, entry.version, entry.rows_written, entry.rows_dead_lettered) == ("done", 1, 9, 1)
    assert entry.interval == interval  # microsecond-exact round trip, aware UTC

    assert ledger.try_claim("orders", interval) is None, "done intervals need reprocess=True"
    again = ledger.try_claim("orders", interval, run_id="manual__2", reprocess=True)
    assert again is not None
    assert ledger.commit(again, reason="manual", rows_written=9, checksum="abc") == 2
    history = ledger.versions("orders", interval)
    assert [(v.version, v.reason, v.run_id) for v in history] == [
        (1, "scheduled", "scheduled__1"),
        (2, "manual", "manual__2"),
    ]


def test_failed_interval_can_be_reclaimed_and_stale_claims_expire(ledger: CheckpointHook) -> None:
    first, second = hourly(2)
    claim = ledger.try_claim("p", first)
    assert claim is not None
    assert ledger.fail(claim, error="boom")
    assert ledger.get("p", first).status == "failed"  # type: ignore[union-attr]
    assert ledger.try_claim("p", first) is not None

    stale = ledger.try_claim("p", second)
    assert stale is not None
    taker = ledger.try_claim("p", second, stale_after=dt.timedelta(0))
    assert taker is not None, "a claim older than stale_after is taken over"
    with pytest.raises(ClaimLostError):
        ledger.commit(stale, reason="scheduled")
    assert ledger.commit(taker, reason="scheduled") == 1


def test_watermark_stops_at_the_first_gap(ledger: CheckpointHook) -> None:
    intervals = hourly(6)
    assert ledger.watermark("p") is None
    for index, interval in enumerate(intervals):
        claim = ledger.try_claim("p", interval)
        assert claim is not None
        if index == 3:
            ledger.fail(claim, error="x")
        elif index != 4:  # index 4 stays running
            ledger.commit(claim, reason="scheduled")
    assert ledger.watermark("p") == intervals[2].end
    assert ledger.newest_done("p").interval == intervals[5]  # type: ignore[union-attr]

    gaps = ledger.gaps("p", start=T0, end=T0 + 8 * HOUR, expected=hourly(8))
    assert [(g.interval, g.status) for g in gaps] == [
        (intervals[3], "failed"),
        (hourly(8)[6], "missing"),
        (hourly(8)[7], "missing"),
    ]
    stale = ledger.gaps("p", start=T0, end=T0 + 6 * HOUR, expected=intervals, stale_after=dt.timedelta(0))
    assert [g.status for g in stale] == ["failed", "stale"]


def test_gaps_without_a_timetable_report_uncovered_time(ledger: CheckpointHook) -> None:
    intervals = hourly(5)
    for interval in (intervals[0], intervals[1], intervals[4]):
        claim = ledger.try_claim("p", interval)
        assert claim is not None
        ledger.commit(claim, reason="scheduled")
    gaps = ledger.gaps("p", start=T0, end=T0 + 6 * HOUR)
    assert [(g.interval, g.status) for g in gaps] == [
        (Interval(intervals[2].start, intervals[3].end), "missing"),
        (Interval(T0 + 5 * HOUR, T0 + 6 * HOUR), "missing"),
    ]


def test_commit_inside_the_callers_transaction_rolls_back_with_it(ledger: CheckpointHook) -> None:
    interval = hourly(1)[0]
    claim = ledger.try_claim("p", interval)
    assert claim is not None
    with pytest.raises(RuntimeError), ledger.engine.begin() as conn:
        ledger.commit(claim, reason="scheduled", connection=conn)
        raise RuntimeError("the data write failed after the checkpoint statement")
    entry = ledger.get("p", interval)
    assert entry is not None and entry.status == "running", "checkpoint must roll back with the data"
    assert ledger.versions("p", interval) == []
    assert ledger.commit(claim, reason="scheduled") == 1


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        Interval(dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2))
    with pytest.raises(ValueError, match="before its start"):
        Interval(T0 + HOUR, T0)
