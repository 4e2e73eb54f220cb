"""Windows from real Airflow timetables: per run, over a stretch of time, and as Airflow's backfill sees them."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronDataIntervalTimetable,
    CronTriggerTimetable,
    DeltaDataIntervalTimetable,
)
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction, Timetable

from airflow_selfheal.intervals import Interval
from airflow_selfheal.timetables import (
    NoDataWindowError,
    backfill_dates,
    check_timetable_has_windows,
    expected_intervals,
    expected_runs,
    window_for_run,
)

UTC = dt.UTC
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
T0 = dt.datetime(2026, 1, 5, tzinfo=UTC)  # a Monday


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def make_dag(schedule: Any, start_date: dt.datetime | None = None, **kwargs: Any) -> DAG:
    return DAG(f"tt_{abs(hash(repr(schedule)))}", schedule=schedule, start_date=start_date or utc(2026, 1, 1), **kwargs)


def backfill_logical_dates(dag: DAG, from_date: dt.datetime, to_date: dt.datetime) -> list[dt.datetime]:
    """The logical dates Airflow's backfill creates runs for (its own enumeration on the serialized DAG)."""
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    return [
        info.logical_date.astimezone(UTC)
        for info in serialized.iter_dagrun_infos_between(from_date, to_date)
        if info.logical_date is not None
    ]


# -- cron trigger: Airflow 3's default for cron strings ----------------------------------------------


def test_cron_string_gives_zero_length_runs_whose_window_reaches_back_to_the_previous_fire_time() -> None:
    dag = make_dag("@hourly")
    assert type(dag.timetable).__name__ == "CronTriggerTimetable"  # what a user gets from schedule="@hourly"

    fire = T0 + 5 * HOUR
    window, explanation = window_for_run(dag, data_interval_start=fire, data_interval_end=fire, logical_date=fire)

    assert window == Interval(fire - HOUR, fire)
    assert "previous fire time" in explanation and "empty" in explanation

    windows = expected_intervals(dag, T0, T0 + 4 * HOUR)
    # The run firing at T0 processes the hour before T0, which lies outside [T0, T0+4h].
    assert windows == [Interval(T0 + i * HOUR, T0 + (i + 1) * HOUR) for i in range(4)]


def test_daily_string_through_a_real_dag() -> None:
    dag = make_dag("@daily")
    runs = expected_runs(dag, T0, T0 + 3 * DAY)
    assert [r.interval for r in runs] == [Interval(T0 + i * DAY, T0 + (i + 1) * DAY) for i in range(3)]
    # The run that processes a day fires at its end: that is its logical date.
    assert [r.logical_date for r in runs] == [T0 + (i + 1) * DAY for i in range(3)]


def test_manual_run_off_the_schedule_processes_the_last_complete_window() -> None:
    at = T0 + 5 * HOUR + dt.timedelta(minutes=17)
    window, explanation = window_for_run(
        CronTriggerTimetable("0 * * * *", timezone="UTC"), data_interval_start=at, data_interval_end=at
    )
    assert window == Interval(T0 + 4 * HOUR, T0 + 5 * HOUR)
    assert "not a fire time" in explanation


# -- data-interval timetables ----------------------------------------------------------------------


def test_cron_data_interval_timetable_uses_its_data_intervals() -> None:
    timetable = CronDataIntervalTimetable("0 */6 * * *", timezone="UTC")
    runs = expected_runs(timetable, T0 + HOUR, T0 + DAY)
    assert [r.interval for r in runs] == [
        Interval(T0 + 6 * HOUR, T0 + 12 * HOUR),
        Interval(T0 + 12 * HOUR, T0 + 18 * HOUR),
        Interval(T0 + 18 * HOUR, T0 + DAY),
    ]
    assert [r.logical_date for r in runs] == [r.interval.start for r in runs]

    window, explanation = window_for_run(
        timetable, data_interval_start=T0 + 6 * HOUR, data_interval_end=T0 + 12 * HOUR, logical_date=T0 + 6 * HOUR
    )
    assert window == Interval(T0 + 6 * HOUR, T0 + 12 * HOUR)
    assert "the run's data interval" in explanation


def test_delta_schedules_count_runs_from_the_dags_start_date() -> None:
    start_date = utc(2026, 1, 1, 0, 15)
    delta_dag = make_dag(DeltaDataIntervalTimetable(HOUR), start_date=start_date)
    plain_dag = make_dag(dt.timedelta(hours=1), start_date=start_date)  # a plain timedelta: DeltaTriggerTimetable
    assert type(plain_dag.timetable).__name__ == "DeltaTriggerTimetable"

    expected = [
        Interval(T0 + dt.timedelta(minutes=15) + i * HOUR, T0 + dt.timedelta(minutes=75) + i * HOUR) for i in range(3)
    ]
    for dag in (delta_dag, plain_dag):
        assert expected_intervals(dag, T0, T0 + 4 * HOUR, anchor=start_date) == expected, dag.timetable

    fire = T0 + dt.timedelta(minutes=15)
    window, _ = window_for_run(plain_dag, data_interval_start=fire, data_interval_end=fire)
    assert window == Interval(fire - HOUR, fire)


# -- DST, and agreement with Airflow's backfill ------------------------------------------------------


@pytest.mark.parametrize("kind", [CronTriggerTimetable, CronDataIntervalTimetable])
def test_daily_schedule_in_berlin_across_the_end_of_dst(kind: Any) -> None:
    # Europe/Berlin leaves summer time on 2026-10-25 at 03:00 CEST: that local day has 25 hours.
    timetable = kind("0 0 * * *", timezone="Europe/Berlin")
    dag = make_dag(timetable, start_date=utc(2026, 10, 1))
    runs = expected_runs(dag, utc(2026, 10, 22), utc(2026, 10, 28))

    lengths = [r.interval.end - r.interval.start for r in runs]
    assert lengths == [DAY, DAY, 25 * HOUR, DAY, DAY]
    assert runs[0].interval.start == utc(2026, 10, 22, 22)  # midnight CEST
    assert runs[-1].interval.end == utc(2026, 10, 27, 23)  # midnight CET

    # Exactly these runs are what a backfill from the first to the last logical date creates.
    from_date, to_date = backfill_dates(dag, runs)
    assert (from_date, to_date) == (runs[0].logical_date, runs[-1].logical_date)
    assert backfill_logical_dates(dag, from_date, to_date) == [r.logical_date for r in runs]

    long_day = runs[2].interval
    # The run for the long day gets exactly the 25-hour window, whether given or derived.
    given_start = long_day.start if kind is CronDataIntervalTimetable else long_day.end
    window, _ = window_for_run(dag, data_interval_start=given_start, data_interval_end=long_day.end)
    assert window == long_day


@pytest.mark.parametrize(
    ("schedule", "days"),
    [
        ("@hourly", 1),
        (CronDataIntervalTimetable("0 * * * *", timezone="Europe/Berlin"), 1),
        (CronTriggerTimetable("30 2 * * *", timezone="Europe/Berlin"), 5),  # 02:30 is skipped on 2026-03-29
        (DeltaDataIntervalTimetable(dt.timedelta(minutes=90)), 1),
    ],
    ids=["cron-trigger", "cron-data-interval", "nonexistent-local-time", "delta"],
)
def test_logical_dates_match_airflows_backfill_enumeration(schedule: Any, days: int) -> None:
    # Europe/Berlin springs forward on 2026-03-29 at 02:00 CET (01:00 UTC); every window spans it.
    start_date = utc(2026, 3, 20, 0, 10)
    dag = make_dag(schedule, start_date=start_date)
    start = utc(2026, 3, 29) - days * DAY / 2
    runs = expected_runs(dag, start, start + days * DAY, anchor=start_date)
    assert len(runs) >= 4
    for first in range(3):  # ranges starting anywhere, including on the DST day
        part = runs[first:]
        from_date, to_date = backfill_dates(dag, part)
        assert backfill_logical_dates(dag, from_date, to_date) == [r.logical_date for r in part]
    for before, after in itertools.pairwise(runs):
        assert before.interval.end == after.interval.start, "windows tile time without gaps or overlaps"


def test_backfill_dates_step_around_a_run_that_airflows_alignment_would_skip() -> None:
    # 02:30 Europe/Berlin does not exist on 2026-03-29; the day before, the run fires at 01:30 UTC.
    # Airflow aligns a from_date of exactly that time past it, so the range must start a moment earlier.
    dag = make_dag(CronTriggerTimetable("30 2 * * *", timezone="Europe/Berlin"))
    runs = expected_runs(dag, utc(2026, 3, 27), utc(2026, 3, 31))
    assert runs[0].logical_date == utc(2026, 3, 28, 1, 30)
    assert backfill_logical_dates(dag, runs[0].logical_date, runs[-1].logical_date)[0] != runs[0].logical_date

    from_date, _ = backfill_dates(dag, runs)
    assert from_date < runs[0].logical_date
    assert backfill_logical_dates(dag, from_date, runs[-1].logical_date) == [r.logical_date for r in runs]


def test_sdk_and_serialized_timetables_give_the_same_windows() -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    dag = make_dag(CronTriggerTimetable("15 */2 * * *", timezone="America/New_York"))
    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert type(serialized.timetable).__module__ == "airflow.timetables.trigger"  # the core class
    assert expected_runs(serialized.timetable, T0, T0 + DAY) == expected_runs(dag.timetable, T0, T0 + DAY)


# -- custom timetables --------------------------------------------------------------------------------


class WeekdayMornings(Timetable):
    """A custom trigger timetable: 06:00 UTC on weekdays, zero-length data intervals."""

    def infer_manual_data_interval(self, *, run_after: Any) -> DataInterval:
        return DataInterval.exact(run_after)

    @staticmethod
    def _next_on_or_after(moment: Any) -> Any:
        candidate = moment.replace(hour=6, minute=0, second=0, microsecond=0)
        if candidate < moment:
            candidate = candidate.add(days=1)
        while candidate.weekday() >= 5:
            candidate = candidate.add(days=1)
        return candidate

    def next_dagrun_info(
        self, *, last_automated_data_interval: DataInterval | None, restriction: TimeRestriction
    ) -> DagRunInfo | None:
        if last_automated_data_interval is not None:
            fire = self._next_on_or_after(last_automated_data_interval.end.add(seconds=1))
        elif restriction.earliest is not None:
            fire = self._next_on_or_after(restriction.earliest)
        else:
            return None
        if restriction.latest is not None and fire > restriction.latest:
            return None
        return DagRunInfo.exact(fire)


def test_custom_timetable_through_the_public_protocol() -> None:
    timetable = WeekdayMornings()
    friday, monday = utc(2026, 1, 9, 6), utc(2026, 1, 12, 6)
    windows = expected_intervals(timetable, utc(2026, 1, 8, 6), utc(2026, 1, 13, 6))
    assert windows == [
        Interval(utc(2026, 1, 8, 6), friday),
        Interval(friday, monday),  # the weekend belongs to Monday's run
        Interval(monday, utc(2026, 1, 13, 6)),
    ]
    window, _ = window_for_run(timetable, data_interval_start=monday, data_interval_end=monday)
    assert window == Interval(friday, monday)
    check_timetable_has_windows(timetable, task_id="load")


# -- schedules without windows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "words"),
    [(None, "schedule=None"), ("@once", "@once"), ([Asset("s3://bucket/orders")], "asset")],
    ids=["none", "once", "assets"],
)
def test_schedules_without_windows_fail_with_a_fix(schedule: Any, words: str) -> None:
    dag = make_dag(schedule)
    with pytest.raises(NoDataWindowError) as raised:
        check_timetable_has_windows(dag, task_id="load")
    message = str(raised.value)
    assert words in message and "'load'" in message and dag.dag_id in message
    assert "CronDataIntervalTimetable" in message and "create_cron_data_intervals" in message

    at = T0 + HOUR
    with pytest.raises(NoDataWindowError, match="empty"):
        window_for_run(dag, data_interval_start=at, data_interval_end=at)
    with pytest.raises(NoDataWindowError):
        expected_intervals(dag, T0, T0 + DAY)
    # A real data interval (e.g. given when triggering) is still processed as is.
    assert window_for_run(dag, data_interval_start=T0, data_interval_end=at)[0] == Interval(T0, at)


def test_assets_or_time_uses_the_time_schedule() -> None:
    schedule = AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=[Asset("s3://bucket/orders")]
    )
    dag = make_dag(schedule)
    check_timetable_has_windows(dag, task_id="load")
    assert expected_intervals(dag, T0, T0 + 2 * HOUR) == [Interval(T0, T0 + HOUR), Interval(T0 + HOUR, T0 + 2 * HOUR)]


def test_bad_input_is_named() -> None:
    with pytest.raises(NoDataWindowError, match="no logical date"):
        window_for_run(make_dag("@hourly"), data_interval_start=None, data_interval_end=None)
    with pytest.raises(ValueError, match="naive"):
        expected_intervals(make_dag("@hourly"), dt.datetime(2026, 1, 1), T0)
    with pytest.raises(ValueError, match="max_runs=10"):
        expected_intervals(make_dag("@hourly"), T0, T0 + DAY, max_runs=10)
    check_timetable_has_windows(None, task_id="load")  # no DAG yet: nothing to check
