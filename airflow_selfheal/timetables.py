"""
The data windows a DAG's timetable implies: per run, and over a stretch of time.

Airflow 3 schedules cron strings with ``CronTriggerTimetable`` by default, whose runs carry an empty
data interval (start == end == logical date). A pipeline still has to process a real window, so for
such runs the window is derived from the timetable itself: from the previous fire time to this one.

Everything here accepts the Task SDK timetable a DAG file builds (``dag.timetable`` on an
``airflow.sdk.DAG``) as well as the core timetable of a serialized DAG, and asks the timetable
through its public scheduling protocol (``next_dagrun_info_v2`` with a ``TimeRestriction``), as
Airflow's scheduler and backfill do, so custom timetables work too.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pendulum

from airflow_selfheal.exceptions import SelfHealError
from airflow_selfheal.intervals import Interval, as_utc
from airflow_selfheal.store.types import utcnow

if TYPE_CHECKING:
    from airflow.timetables.base import DagRunInfo, Timetable

log = logging.getLogger(__name__)

#: Refuse to enumerate more runs than this in one call: a horizon that large is almost surely a mistake.
DEFAULT_MAX_RUNS = 200_000
# How far back a window is searched for before giving up (irregular timetables, e.g. events).
_MAX_LOOKBACK = dt.timedelta(days=366 * 50)
_FIX_HINT = (
    "give the DAG a periodic schedule: a cron string or preset (e.g. schedule='@hourly'), a timedelta, "
    "CronDataIntervalTimetable(...) / DeltaDataIntervalTimetable(...) from airflow.sdk for explicit data "
    "intervals (or set [scheduler] create_cron_data_intervals=True), or a custom periodic timetable"
)


class NoDataWindowError(SelfHealError, ValueError):
    """The DAG's schedule gives its runs no data window to process; the message says how to fix the DAG."""


@dataclass(frozen=True, order=True)
class ExpectedRun:
    """
    One run the timetable schedules, and the window it must process.

    :param interval: the data window of the run (derived for runs with an empty data interval).
    :param logical_date: the run's logical date (UTC): what Airflow's backfill selects runs by.
    :param run_after: when the run becomes due (UTC).
    """

    interval: Interval
    logical_date: dt.datetime
    run_after: dt.datetime


def core_timetable(dag_or_timetable: Any) -> Timetable:
    """
    The core (scheduler-side) timetable of a DAG or timetable object.

    An ``airflow.sdk.DAG`` holds a Task SDK timetable that only describes the schedule; the logic lives in
    the matching ``airflow.timetables`` class, reached through Airflow's own serialization round trip.
    """
    timetable = getattr(dag_or_timetable, "timetable", dag_or_timetable)
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import Timetable

    core = coerce_to_core_timetable(timetable)
    if not isinstance(core, Timetable):
        raise TypeError(f"expected a DAG or a timetable, got {type(dag_or_timetable).__name__}: {dag_or_timetable!r}")
    return core


def no_window_reason(timetable: Any) -> str | None:
    """Why runs of ``timetable`` (a DAG, SDK or core timetable) have no derivable data window; ``None`` if they do."""
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.simple import AssetTriggeredTimetable, ContinuousTimetable, OnceTimetable

    core = core_timetable(timetable)
    if isinstance(core, AssetOrTimeSchedule):
        return no_window_reason(core.timetable)  # the time-based part decides the windows
    if isinstance(core, AssetTriggeredTimetable):
        return "asset-triggered runs happen when assets update, not per period of time"
    if not core.can_be_scheduled:
        return "schedule=None: runs happen only when triggered and cover no period of time"
    if isinstance(core, OnceTimetable):
        return "'@once' runs a single time and covers no period of time"
    if isinstance(core, ContinuousTimetable):
        return "'@continuous' runs back to back with windows that depend on when each run starts"
    if getattr(core, "partitioned", False):
        return f"{type(core).__name__} schedules partition keys, not data windows"
    if not core.periodic:
        return f"{type(core).__name__} is not periodic"
    return None


def check_timetable_has_windows(dag_or_timetable: Any, *, task_id: str) -> None:
    """
    Fail at DAG parse time when the DAG's runs give no data window an interval operator could process.

    :param dag_or_timetable: the operator's DAG (or a timetable); ``None`` (no DAG yet) is accepted.
    :param task_id: named in the error so the user finds the task.
    :raises NoDataWindowError: with a message that says how to fix the DAG.
    """
    if dag_or_timetable is None:
        return
    try:
        reason = no_window_reason(dag_or_timetable)
    except Exception:
        # e.g. a custom timetable not registered by a plugin yet: DAG serialization reports that itself.
        log.debug("Could not inspect the timetable of task %s", task_id, exc_info=True)
        return
    if reason is not None:
        dag_id = getattr(dag_or_timetable, "dag_id", None)
        where = f"DAG {dag_id!r}, task {task_id!r}" if dag_id else f"task {task_id!r}"
        raise NoDataWindowError(f"{where}: the schedule gives runs no data window to process ({reason}); {_FIX_HINT}")


def _pendulum(value: dt.datetime) -> pendulum.DateTime:
    # Timetables call pendulum methods (in_timezone) on the restriction's bounds.
    return pendulum.instance(as_utc(value))


def _iter_infos(
    core: Timetable, earliest: dt.datetime, latest: dt.datetime | None, *, fast: bool = True
) -> Iterator[DagRunInfo]:
    """Runs scheduled with logical dates in ``[earliest, latest]``, enumerated as Airflow's backfill does."""
    from airflow.timetables.base import TimeRestriction

    restriction = TimeRestriction(_pendulum(earliest), None if latest is None else _pendulum(latest), catchup=True)
    fast_next = _fast_successor(core) if fast else None
    info: DagRunInfo | None = None
    while True:
        if info is not None and fast_next is not None:
            info = fast_next(info, restriction)
        else:
            info = core.next_dagrun_info_v2(last_dagrun_info=info, restriction=restriction)
        if info is None or info.data_interval is None:
            return
        yield info


def _fast_successor(core: Timetable) -> Any:
    """
    A cheaper equivalent of ``next_dagrun_info_v2`` for Airflow's own data-interval timetables.

    Their protocol re-aligns both bounds on every call (five cron evaluations per run); for a run that
    follows an aligned run the result is always ``[previous end, next fire)``, one evaluation.
    tests/test_timetables.py checks that both ways agree, DST included.
    """
    from airflow.timetables.base import DagRunInfo
    from airflow.timetables.interval import CronDataIntervalTimetable, DeltaDataIntervalTimetable

    if type(core) not in (CronDataIntervalTimetable, DeltaDataIntervalTimetable):
        return None
    get_next = core._get_next  # type: ignore[attr-defined]

    def successor(info: DagRunInfo, restriction: Any) -> DagRunInfo | None:
        assert info.data_interval is not None
        start = info.data_interval.end
        if restriction.latest is not None and start > restriction.latest:
            return None
        return DagRunInfo.interval(start=start, end=get_next(start))

    return successor


def _iter_runs(core: Timetable, earliest: dt.datetime, latest: dt.datetime | None) -> Iterator[ExpectedRun]:
    """
    Runs from ``earliest`` on with their windows.

    A run with an empty data interval processes the time since the previous run's fire time; the
    first such run of the enumeration has no known predecessor and is left out.
    """
    previous_end: dt.datetime | None = None
    for info in _iter_infos(core, earliest, latest):
        assert info.data_interval is not None
        start, end = as_utc(info.data_interval.start), as_utc(info.data_interval.end)
        if previous_end is not None and end <= previous_end:
            raise SelfHealError(f"timetable {core.summary!r} did not advance past {previous_end.isoformat()}")
        window: Interval | None = None
        if end > start:
            window = Interval(start, end)
        elif previous_end is not None:
            window = Interval(previous_end, end)
        previous_end = end
        if window is not None:
            logical = info.logical_date if info.logical_date is not None else info.data_interval.start
            yield ExpectedRun(window, as_utc(logical), as_utc(info.run_after))


def _grid_is_absolute(core: Timetable) -> bool:
    """Whether fire times are fixed by the calendar (cron, events) rather than counted from the start date."""
    from airflow.timetables._cron import CronMixin
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.events import EventsTimetable
    from airflow.timetables.trigger import MultipleCronTriggerTimetable

    if isinstance(core, AssetOrTimeSchedule):
        return _grid_is_absolute(core.timetable)
    return isinstance(core, CronMixin | MultipleCronTriggerTimetable | EventsTimetable)


def expected_runs(
    timetable: Any,
    start: dt.datetime,
    end: dt.datetime,
    *,
    anchor: dt.datetime | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> list[ExpectedRun]:
    """
    The runs whose windows lie within ``[start, end]``, oldest first, with their logical dates.

    :param timetable: a DAG, or its SDK or core timetable.
    :param start: no window starts before this (aware).
    :param end: no window ends after this (aware); pass "now" for the runs that are due.
    :param anchor: the DAG's start date. Timedelta schedules count their runs from it, so it fixes
        which runs exist; cron and event schedules do not need it.
    :param max_runs: refuse to enumerate more runs than this (a horizon that wide is likely a mistake).
    :raises NoDataWindowError: the timetable has no data windows (``None``, ``@once``, assets).
    """
    window = Interval(as_utc(start, argument="start"), as_utc(end, argument="end"))
    core = core_timetable(timetable)
    reason = no_window_reason(core)
    if reason is not None:
        raise NoDataWindowError(f"timetable {core.summary!r} has no data windows to enumerate ({reason}); {_FIX_HINT}")
    earliest = window.start
    if anchor is not None and not _grid_is_absolute(core):
        anchor_utc = as_utc(anchor, argument="anchor")
        if anchor_utc < earliest:
            earliest = anchor_utc  # walk the grid from where the scheduler started it
    runs: list[ExpectedRun] = []
    for count, run in enumerate(_iter_runs(core, earliest, window.end), start=1):
        if count > max_runs:
            raise ValueError(
                f"more than max_runs={max_runs} runs of {core.summary!r} between {earliest.isoformat()} and "
                f"{window.end.isoformat()}: shorten the horizon or raise max_runs"
            )
        if run.interval.start >= window.start and run.interval.end <= window.end:
            runs.append(run)
    return runs


def expected_intervals(
    timetable: Any,
    start: dt.datetime,
    end: dt.datetime,
    *,
    anchor: dt.datetime | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> list[Interval]:
    """
    The data windows a DAG with ``timetable`` should process within ``[start, end]``, oldest first.

    Data-interval timetables give their data intervals; trigger timetables (Airflow 3's default for cron
    strings and timedeltas) give the span from each fire time to the next. See :func:`expected_runs`.
    """
    return [run.interval for run in expected_runs(timetable, start, end, anchor=anchor, max_runs=max_runs)]


def _window_ending_by(core: Timetable, moment: dt.datetime) -> Interval | None:
    """The last window of ``core`` that ends at or before ``moment``, searching back as far as needed."""
    ahead = list(itertools.islice(_iter_infos(core, moment, None), 2))
    cadence = dt.timedelta(days=1)
    if len(ahead) == 2:
        first, second = (info.data_interval for info in ahead)
        assert first is not None and second is not None
        if second.end > first.end:
            cadence = second.end - first.end
    lookback = 2 * cadence
    while lookback <= _MAX_LOOKBACK:
        found: Interval | None = None
        for run in _iter_runs(core, moment - lookback, moment):
            if run.interval.end <= moment:
                found = run.interval
        if found is not None:
            return found
        lookback *= 2
    return None


def window_for_run(
    timetable: Any,
    *,
    data_interval_start: dt.datetime | None,
    data_interval_end: dt.datetime | None,
    logical_date: dt.datetime | None = None,
) -> tuple[Interval, str]:
    """
    The window one run must process, and a one-line explanation for the task log.

    A run whose data interval has a length processes exactly it. An empty data interval (Airflow 3's
    default cron and timedelta schedules: start == end == logical date) is widened to the span from the
    timetable's previous fire time to this one. A run that is not on a fire time (a manual run) gets the
    last complete window before it.

    :param timetable: the DAG, or its SDK or core timetable.
    :raises NoDataWindowError: the run has an empty interval and the timetable defines no windows.
    """
    start = None if data_interval_start is None else as_utc(data_interval_start, argument="data_interval_start")
    end = None if data_interval_end is None else as_utc(data_interval_end, argument="data_interval_end")
    if start is not None and end is not None and end > start:
        interval = Interval(start, end)
        return interval, f"processing {interval}: the run's data interval"

    moment = end or start or (None if logical_date is None else as_utc(logical_date, argument="logical_date"))
    if moment is None:
        raise NoDataWindowError(
            "the run has no data interval and no logical date (a manual run without a logical date?); "
            "trigger it with a logical date or a data interval"
        )
    core = core_timetable(timetable)
    reason = no_window_reason(core)
    if reason is not None:
        raise NoDataWindowError(
            f"the run's data interval is empty (at {moment.isoformat()}) and the schedule defines no window to "
            f"derive ({reason}); {_FIX_HINT}"
        )
    derived = _window_ending_by(core, moment)
    if derived is None:
        raise NoDataWindowError(
            f"timetable {core.summary!r} has no fire time before {moment.isoformat()}, so the run at that time has "
            "no window to process; trigger it with an explicit data interval"
        )
    interval = derived
    if interval.end == moment:
        explanation = (
            f"processing {interval}: the run's data interval is empty (start == end == {moment.isoformat()}, "
            f"as {type(core).__name__} gives), so the window runs from the previous fire time of "
            f"{core.summary!r} to this one"
        )
    else:
        explanation = (
            f"processing {interval}: the run's data interval is empty and {moment.isoformat()} is not a fire time "
            f"of {core.summary!r} (a manual run?), so the last complete window before it is processed"
        )
    return interval, explanation


def _backfill_logical_dates(
    core: Timetable, from_date: dt.datetime, to_date: dt.datetime, now: dt.datetime, limit: int
) -> list[dt.datetime]:
    """The logical dates Airflow's backfill creates runs for (same protocol, same "ended before now" filter)."""
    dates: list[dt.datetime] = []
    for info in itertools.islice(_iter_infos(core, from_date, to_date, fast=False), limit):
        assert info.data_interval is not None
        if info.logical_date is not None and as_utc(info.data_interval.end) < now:
            dates.append(as_utc(info.logical_date))
    return dates


def backfill_dates(
    timetable: Any, runs: Sequence[ExpectedRun], *, now: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """
    The inclusive ``from_date`` and ``to_date`` for which Airflow's backfill creates exactly ``runs``.

    Airflow selects backfill runs by logical date after aligning ``from_date`` to the schedule, so the
    first run's logical date is the natural ``from_date``. Around DST changes a cron time that does not
    exist locally (02:30 on the spring-forward day) makes that alignment skip a run; a ``from_date`` just
    before the first run then selects it. Each candidate is checked against Airflow's own enumeration.

    :param runs: consecutive runs of ``timetable`` (as :func:`expected_runs` returns them), oldest first.
    :raises SelfHealError: no pair of dates selects exactly these runs.
    """
    if not runs:
        raise ValueError("runs must not be empty")
    core = core_timetable(timetable)
    wanted = [run.logical_date for run in runs]
    current = utcnow() if now is None else as_utc(now, argument="now")
    for from_date in (wanted[0], wanted[0] - dt.timedelta(seconds=1)):
        if _backfill_logical_dates(core, from_date, wanted[-1], current, len(wanted) + 2) == wanted:
            return from_date, wanted[-1]
    raise SelfHealError(
        f"no backfill dates of timetable {core.summary!r} select exactly the {len(wanted)} runs from "
        f"{wanted[0].isoformat()} to {wanted[-1].isoformat()}"
    )
