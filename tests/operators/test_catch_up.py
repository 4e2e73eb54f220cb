"""Catch-up: gaps from the ledger and the timetable, merged into ranges, requested as real Airflow backfills."""

from __future__ import annotations

import datetime as dt
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from airflow.sdk import DAG, CronDataIntervalTimetable, CronTriggerTimetable

from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.catch_up import CatchUpOperator, MissedRun, contiguous_ranges, find_gaps
from airflow_selfheal.timetables import ExpectedRun, NoDataWindowError, expected_runs
from tests.airflow_harness import AirflowDb, AirflowServer
from tests.conftest import _prefix_for, database_for

UTC = dt.UTC
HOUR = dt.timedelta(hours=1)
T0 = dt.datetime(2026, 2, 1, tzinfo=UTC)


@pytest.fixture
def ledger(database, table_prefix) -> CheckpointHook:  # type: ignore[no-untyped-def]
    return CheckpointHook(database.conn_id, table_prefix=table_prefix)


def fill_ledger(ledger: CheckpointHook, runs: list[ExpectedRun], *, done: set[int], failed: set[int]) -> None:
    for position in sorted(done | failed):
        claim = ledger.try_claim("orders", runs[position].interval, run_id=f"scheduled__{position}")
        assert claim is not None
        if position in done:
            ledger.commit(claim, reason="scheduled", rows_written=10)
        else:
            ledger.fail(claim, error="source unreachable")


def missed(*positions: int) -> list[MissedRun]:
    return [
        MissedRun(
            ExpectedRun(Interval(T0 + p * HOUR, T0 + (p + 1) * HOUR), T0 + p * HOUR, T0 + (p + 1) * HOUR), "missing", p
        )
        for p in positions
    ]


# -- pure merging ------------------------------------------------------------------------------------


def test_consecutive_runs_merge_into_one_range_each() -> None:
    ranges = contiguous_ranges(reversed(missed(0, 1, 2, 5, 6, 9)))
    assert [[m.position for m in r.missed] for r in ranges] == [[0, 1, 2], [5, 6], [9]]
    assert ranges[0].interval == Interval(T0, T0 + 3 * HOUR)
    assert (ranges[1].first_logical_date, ranges[1].last_logical_date) == (T0 + 5 * HOUR, T0 + 6 * HOUR)
    assert ranges[1].as_dict()["statuses"] == {"missing": 2}

    split = contiguous_ranges(missed(0, 1, 2, 3, 4), max_intervals=2)
    assert [len(r.missed) for r in split] == [2, 2, 1]
    assert contiguous_ranges([]) == []
    with pytest.raises(ValueError, match="max_intervals"):
        contiguous_ranges(missed(0), max_intervals=0)


# -- gaps against a real ledger ----------------------------------------------------------------------


def test_find_gaps_reports_missing_failed_and_stale_runs(ledger: CheckpointHook) -> None:
    timetable = CronTriggerTimetable("0 * * * *", timezone="UTC")
    end = T0 + 10 * HOUR
    runs = expected_runs(timetable, T0, end)
    assert len(runs) == 10
    fill_ledger(ledger, runs, done={0, 1, 4, 8}, failed={3})
    assert ledger.try_claim("orders", runs[6].interval) is not None  # its worker will "die"
    time.sleep(0.6)
    assert ledger.try_claim("orders", runs[9].interval) is not None  # alive: not a gap

    gaps = find_gaps(ledger, "orders", timetable, start=T0, end=end, stale_after=dt.timedelta(seconds=0.3))

    assert [(g.position, g.status) for g in gaps] == [
        (2, "missing"),
        (3, "failed"),
        (5, "missing"),
        (6, "stale"),
        (7, "missing"),
    ]
    first, second = contiguous_ranges(gaps)
    assert first.interval == Interval(T0 + 2 * HOUR, T0 + 4 * HOUR)
    # Trigger timetable: a run fires at the end of the window it processes; that is its logical date.
    assert (first.first_logical_date, first.last_logical_date) == (T0 + 3 * HOUR, T0 + 4 * HOUR)
    assert second.as_dict()["statuses"] == {"missing": 2, "stale": 1}
    assert find_gaps(ledger, "other_pipeline", timetable, start=T0, end=T0 + 2 * HOUR)[0].status == "missing"


def test_find_gaps_with_data_intervals_uses_window_starts_as_logical_dates(ledger: CheckpointHook) -> None:
    timetable = CronDataIntervalTimetable("0 */6 * * *", timezone="UTC")
    end = T0 + 24 * HOUR
    runs = expected_runs(timetable, T0, end)
    fill_ledger(ledger, runs, done={0, 3}, failed=set())

    (gap_range,) = contiguous_ranges(find_gaps(ledger, "orders", timetable, start=T0, end=end))
    assert gap_range.interval == Interval(T0 + 6 * HOUR, T0 + 18 * HOUR)
    assert (gap_range.first_logical_date, gap_range.last_logical_date) == (T0 + 6 * HOUR, T0 + 12 * HOUR)


# -- validation at DAG parse time --------------------------------------------------------------------


def test_arguments_are_validated_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="reprocess_behavior"):
        CatchUpOperator(task_id="c", pipeline="orders", reprocess_behavior="all")
    with pytest.raises(ValueError, match="max_active_runs"):
        CatchUpOperator(task_id="c", pipeline="orders", max_active_runs=0)
    with pytest.raises(ValueError, match="horizon"):
        CatchUpOperator(task_id="c", pipeline="orders", horizon=dt.timedelta(0))
    with pytest.raises(ValueError, match="target_timetable"):
        CatchUpOperator(task_id="c", pipeline="orders", target_dag_id="orders_hourly")
    with pytest.raises(ValueError, match="horizon= or target_start_date="):
        CatchUpOperator(
            task_id="c",
            pipeline="orders",
            target_dag_id="orders_hourly",
            target_timetable=CronTriggerTimetable("@hourly", timezone="UTC"),
        )
    with (
        DAG("catch_up_unscheduled", schedule=None, start_date=T0),
        pytest.raises(NoDataWindowError, match="schedule=None"),
    ):
        CatchUpOperator(task_id="c", pipeline="orders")


# -- as a real task ------------------------------------------------------------------------------------


def test_runs_as_a_task_with_the_dags_own_timetable(airflow_db: AirflowDb, sqlite_prefix: str) -> None:
    """Under dag.test(): templated pipeline, the task context's DAG and timetable, the XCom summary."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    store = database_for("sqlite").conn_id
    now = dt.datetime.now(UTC)
    with DAG("catch_up_as_task", schedule="@hourly", start_date=now - 2 * dt.timedelta(days=1), catchup=False) as dag:
        CatchUpOperator(
            task_id="catch_up",
            pipeline="{{ dag.dag_id }}",
            selfheal_conn_id=store,
            table_prefix=sqlite_prefix,
            horizon=dt.timedelta(hours=6),
        )
    ledger = CheckpointHook(store, table_prefix=sqlite_prefix)
    # Everything in the horizon is done (up to an hour ahead, should the clock pass an hour meanwhile).
    for run in expected_runs(dag, now - 7 * HOUR, now + 2 * HOUR):
        claim = ledger.try_claim("catch_up_as_task", run.interval)
        assert claim is not None
        ledger.commit(claim, reason="scheduled")

    dag_run = airflow_db.run_dag(dag, logical_date=now.replace(minute=0, second=0, microsecond=0))

    assert dag_run.state == "success"
    with create_session() as session:
        (xcom,) = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag.dag_id, key="return_value"))
        summary = XComModel.deserialize_value(xcom)
    assert summary["pipeline"] == "catch_up_as_task"
    assert (summary["gaps"], summary["ranges_requested"], summary["ranges_skipped"]) == (0, [], [])
    assert dt.datetime.fromisoformat(summary["end"]) - dt.datetime.fromisoformat(summary["start"]) == 6 * HOUR


# -- the REST path, against a real Airflow -----------------------------------------------------------

TARGET_DAGS = """
from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, CronDataIntervalTimetable

START = dt.datetime.fromisoformat("{start}")

# Paused: the backfill's runs stay queued, so the test sees exactly which runs it created.
for dag_id, schedule in {{
    "{prefix}_trigger": "@hourly",
    "{prefix}_interval": CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
}}.items():
    with DAG(dag_id, schedule=schedule, start_date=START, catchup=False, is_paused_upon_creation=True) as dag:
        EmptyOperator(task_id="load")
    globals()[dag_id] = dag
"""


@pytest.fixture
def sqlite_prefix() -> Iterator[str]:
    yield from _prefix_for(database_for("sqlite"))


@pytest.mark.airflow_server
def test_gaps_become_backfills_of_exactly_the_missed_runs(
    airflow_server: AirflowServer, airflow_api_conn_id: str, sqlite_prefix: str
) -> None:
    store = database_for("sqlite").conn_id
    prefix = f"catchup_{uuid.uuid4().hex[:6]}"
    start = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - 8 * HOUR
    source = textwrap.dedent(TARGET_DAGS.format(start=start.isoformat(), prefix=prefix))
    airflow_server.write_dag(f"{prefix}.py", source)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"{prefix}.py", "exec"), namespace)  # the same DAG objects the server parsed

    for kind in ("trigger", "interval"):
        dag_id = f"{prefix}_{kind}"
        dag = namespace[dag_id]
        pipeline = f"orders_{kind}"
        runs = expected_runs(dag, start, dt.datetime.now(UTC), anchor=start)
        assert len(runs) >= 8, runs
        ledger = CheckpointHook(store, table_prefix=sqlite_prefix)
        for position in (0, 1, 3, 4):
            claim = ledger.try_claim(pipeline, runs[position].interval)
            assert claim is not None
            if position == 3:
                ledger.fail(claim, error="boom")
            else:
                ledger.commit(claim, reason="scheduled")
        # Gaps: positions 2-3 (missing, failed), then 5 onwards (missing).
        wanted = [runs[2].logical_date, runs[3].logical_date]

        operator = CatchUpOperator(
            task_id="catch_up",
            pipeline=pipeline,
            selfheal_conn_id=store,
            table_prefix=sqlite_prefix,
            airflow_api_conn_id=airflow_api_conn_id,
            max_active_runs=2,
            dag=dag,
        )
        context: Any = {"dag": dag, "run_id": "manual__catch_up", "dag_run": None}
        summary = operator.execute(context)

        (requested,) = summary["ranges_requested"]
        assert requested["statuses"] == {"failed": 1, "missing": 1}
        (deferred,) = summary["ranges_skipped"]
        assert "deferred" in deferred["reason"] and deferred["first_logical_date"] == runs[5].logical_date.isoformat()

        (backfill,) = airflow_server.api("GET", "/backfills", params={"dag_id": dag_id})["backfills"]
        assert backfill["id"] == requested["backfill_id"] and backfill["completed_at"] is None
        assert (backfill["reprocess_behavior"], backfill["max_active_runs"]) == ("failed", 2)
        created = sorted(
            dt.datetime.fromisoformat(r["logical_date"])
            for r in airflow_server.runs(dag_id)
            if r["run_type"] == "backfill"
        )
        assert created == wanted, f"{kind}: the backfill must create exactly the missed runs"

        (event,) = HealEventHook(store, table_prefix=sqlite_prefix).list_events(pipeline=pipeline)
        assert (event.kind, event.dag_id, event.detail["backfill_id"]) == ("backfill_requested", dag_id, backfill["id"])
        assert event.interval == Interval(runs[2].interval.start, runs[3].interval.end)

        # Again while the backfill runs: nothing new is requested, and a direct request gets 409 -> skipped.
        again = operator.execute(context)
        assert again["ranges_requested"] == []
        assert "covered by active backfill" in again["ranges_skipped"][0]["reason"]
        result, reason = operator._create(dag_id, runs[5].logical_date, runs[-1].logical_date)
        assert result is None and "409" in reason

        airflow_server.api("PUT", f"/backfills/{backfill['id']}/cancel")
