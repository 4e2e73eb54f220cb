"""
Catch-up through Airflow's own backfill: find the intervals a pipeline missed and request backfills for them.

The intervals that should exist come from the target DAG's timetable; the ledger says which are done.
Whatever is missing, failed or stale is merged into runs of consecutive intervals, and each run of
intervals becomes one ``POST /api/v2/backfills`` whose inclusive dates select exactly those DAG runs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_selfheal.exceptions import SelfHealError
from airflow_selfheal.hooks.airflow_api import AirflowApiError, AirflowApiHook
from airflow_selfheal.hooks.checkpoint import DEFAULT_STALE_AFTER, CheckpointHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.intervals import Interval, as_utc
from airflow_selfheal.store.types import utcnow
from airflow_selfheal.timetables import ExpectedRun, backfill_dates, check_timetable_has_windows, expected_runs

if TYPE_CHECKING:
    from airflow.sdk import Context

REPROCESS_BEHAVIORS = ("none", "failed", "completed")
HEAL_EVENT_KIND = "backfill_requested"


@dataclass(frozen=True)
class MissedRun:
    """
    A run of the target DAG whose interval the ledger does not show as done.

    :param run: the run and the window it processes.
    :param status: ``missing``, ``failed`` or ``stale`` (a claim whose worker is gone).
    :param position: index of the run in the timetable's sequence; consecutive positions form one range.
    """

    run: ExpectedRun
    status: str
    position: int


@dataclass(frozen=True)
class GapRange:
    """Consecutive missed runs: one backfill request, its dates inclusive."""

    missed: tuple[MissedRun, ...]

    @property
    def interval(self) -> Interval:
        """From the first window's start to the last window's end."""
        return Interval(self.missed[0].run.interval.start, self.missed[-1].run.interval.end)

    @property
    def first_logical_date(self) -> dt.datetime:
        """Logical date of the first run (Airflow's backfill selects runs by logical date)."""
        return self.missed[0].run.logical_date

    @property
    def last_logical_date(self) -> dt.datetime:
        """Logical date of the last run."""
        return self.missed[-1].run.logical_date

    def overlaps(self, from_date: dt.datetime, to_date: dt.datetime) -> bool:
        """Whether a backfill over logical dates ``[from_date, to_date]`` covers any run of this range."""
        return self.first_logical_date <= to_date and from_date <= self.last_logical_date

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description for logs, XCom and heal events."""
        return {
            "first_logical_date": self.first_logical_date.isoformat(),
            "last_logical_date": self.last_logical_date.isoformat(),
            "start": self.interval.start.isoformat(),
            "end": self.interval.end.isoformat(),
            "intervals": len(self.missed),
            "statuses": dict(sorted(Counter(m.status for m in self.missed).items())),
        }


def find_gaps(
    ledger: CheckpointHook,
    pipeline: str,
    timetable: Any,
    *,
    start: dt.datetime,
    end: dt.datetime,
    anchor: dt.datetime | None = None,
    stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
) -> list[MissedRun]:
    """
    The runs within ``[start, end]`` whose intervals are missing, failed or stale in the ledger, oldest first.

    :param ledger: the pipeline's checkpoint ledger.
    :param timetable: the target DAG, or its SDK or core timetable: it says which intervals should exist.
    :param anchor: the target DAG's start date (timedelta schedules count their runs from it).
    :param stale_after: a running claim older than this counts as a gap (its worker died).
    """
    runs = expected_runs(timetable, start, end, anchor=anchor)
    positions = {run.interval: (position, run) for position, run in enumerate(runs)}
    gaps = ledger.gaps(pipeline, start=start, end=end, expected=list(positions), stale_after=stale_after)
    missed = []
    for gap in gaps:
        position, run = positions[gap.interval]
        missed.append(MissedRun(run, gap.status, position))
    return missed


def contiguous_ranges(missed: Iterable[MissedRun], *, max_intervals: int | None = None) -> list[GapRange]:
    """
    Merge missed runs into ranges of consecutive runs, oldest first.

    Runs are consecutive when nothing the timetable schedules lies between them, so a backfill from
    the first run's logical date to the last one's creates exactly the range's runs and no done ones.

    :param max_intervals: split ranges longer than this (``None``: no limit).
    """
    if max_intervals is not None and max_intervals < 1:
        raise ValueError(f"max_intervals must be at least 1, got {max_intervals!r}")
    ranges: list[list[MissedRun]] = []
    for item in sorted(missed, key=lambda m: m.position):
        current = ranges[-1] if ranges else None
        if (
            current is not None
            and item.position == current[-1].position + 1
            and (max_intervals is None or len(current) < max_intervals)
        ):
            current.append(item)
        else:
            ranges.append([item])
    return [GapRange(tuple(items)) for items in ranges]


def _parse_time(value: Any) -> dt.datetime | None:
    """A timestamp of Airflow's REST API (ISO 8601, possibly with ``Z``) as aware UTC."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime.fromisoformat(str(value))
    return as_utc(value)


def _covering(gap_range: GapRange, backfills: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first backfill whose logical dates overlap ``gap_range``."""
    for backfill in backfills:
        from_date, to_date = _parse_time(backfill.get("from_date")), _parse_time(backfill.get("to_date"))
        if from_date is not None and to_date is not None and gap_range.overlaps(from_date, to_date):
            return backfill
    return None


def _status_code(error: AirflowApiError) -> int | None:
    code = getattr(error, "status_code", None)
    if isinstance(code, int):
        return code
    match = re.search(r" -> (\d{3})\b", str(error))  # AirflowApiHook's message: "POST /backfills -> 409: ..."
    return int(match.group(1)) if match else None


class CatchUpOperator(BaseOperator):
    """
    Find the intervals a pipeline missed and turn them into Airflow backfills, oldest first.

    The intervals that should exist come from the target DAG's timetable between the horizon and now;
    the ledger says which are done. Missing, failed and stale intervals are merged into ranges of
    consecutive runs, and each range is requested through ``POST /api/v2/backfills`` with dates that
    select exactly its runs. Each request is recorded as a ``backfill_requested`` heal event.

    Airflow runs one backfill per DAG at a time (a second one is refused with 409). A range that an
    active backfill already covers is skipped; the other ranges are deferred (reported as skipped)
    while any backfill of the DAG is active, and requested by a later run of this operator.

    Where the target's timetable comes from: task code cannot read Airflow's metadata database, and the
    REST API describes a schedule only in words. So by default the target is this task's own DAG, whose
    timetable and start date the task has at hand; for another DAG pass ``target_timetable`` (e.g.
    ``CronDataIntervalTimetable("@hourly", timezone="UTC")`` or the other DAG object's ``timetable``).
    Runs of a backfill of its own DAG skip the search (they would only find the backfill they are part of).

    :param pipeline: the ledger's pipeline name (templated).
    :param target_dag_id: DAG to backfill; default: this task's DAG.
    :param target_timetable: timetable of ``target_dag_id`` when it is another DAG (SDK or core timetable).
    :param target_start_date: start date of ``target_dag_id`` when it is another DAG: the default horizon,
        and the origin timedelta schedules count their runs from.
    :param selfheal_conn_id: connection of the state store (default ``[selfheal] conn_id``).
    :param table_prefix: prefix of the state tables (default ``[selfheal] table_prefix``).
    :param airflow_api_conn_id: connection to Airflow's REST API (type ``selfheal_airflow_api``).
    :param horizon: how far back from now to look; default: since the target DAG's start date.
    :param reprocess_behavior: what the backfill does with runs that already exist: ``none`` (leave them),
        ``failed`` (rerun failed ones) or ``completed`` (rerun all).
    :param max_active_runs: concurrent runs of each backfill.
    :param stale_after: a running claim older than this counts as missed (its worker died).
    :param max_ranges: request at most this many ranges per execution (``None``: all that Airflow accepts).
    :param max_intervals_per_range: split longer ranges into backfills of at most this many runs.
    :param dry_run: find and report, but create no backfill and record no heal event.
    """

    template_fields: Sequence[str] = ("pipeline",)
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        pipeline: str,
        target_dag_id: str | None = None,
        target_timetable: Any = None,
        target_start_date: dt.datetime | None = None,
        selfheal_conn_id: str | None = None,
        table_prefix: str | None = None,
        airflow_api_conn_id: str = AirflowApiHook.default_conn_name,
        horizon: dt.timedelta | None = None,
        reprocess_behavior: str = "failed",
        max_active_runs: int = 1,
        stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
        max_ranges: int | None = None,
        max_intervals_per_range: int | None = None,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(pipeline, str) or not pipeline.strip():
            raise ValueError(f"pipeline must be a non-empty string, got {pipeline!r}")
        if reprocess_behavior not in REPROCESS_BEHAVIORS:
            raise ValueError(f"reprocess_behavior must be one of {REPROCESS_BEHAVIORS}, got {reprocess_behavior!r}")
        if isinstance(max_active_runs, bool) or not isinstance(max_active_runs, int) or max_active_runs < 1:
            raise ValueError(f"max_active_runs must be a positive integer, got {max_active_runs!r}")
        if horizon is not None and (not isinstance(horizon, dt.timedelta) or horizon <= dt.timedelta(0)):
            raise ValueError(f"horizon must be a positive timedelta or None, got {horizon!r}")
        if not isinstance(stale_after, dt.timedelta) or stale_after <= dt.timedelta(0):
            raise ValueError(f"stale_after must be a positive timedelta, got {stale_after!r}")
        for name, value in (("max_ranges", max_ranges), ("max_intervals_per_range", max_intervals_per_range)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if target_start_date is not None:
            as_utc(target_start_date, argument="target_start_date")
        own_dag_id = self.dag.dag_id if self.has_dag() else None
        if target_dag_id is not None and target_dag_id != own_dag_id:
            if target_timetable is None:
                raise ValueError(
                    f"target_timetable is required when target_dag_id={target_dag_id!r} is another DAG: a task cannot "
                    "read another DAG's schedule (pass e.g. CronTriggerTimetable('@hourly', timezone='UTC'))"
                )
            if horizon is None and target_start_date is None:
                raise ValueError(
                    f"target_dag_id={target_dag_id!r} is another DAG: pass horizon= or target_start_date= to say "
                    "how far back to look"
                )
        check_timetable_has_windows(
            target_timetable if target_timetable is not None else (self.dag if self.has_dag() else None),
            task_id=self.task_id,
        )
        self.pipeline = pipeline
        self.target_dag_id = target_dag_id
        self.target_timetable = target_timetable
        self.target_start_date = target_start_date
        self.selfheal_conn_id = selfheal_conn_id
        self.table_prefix = table_prefix
        self.airflow_api_conn_id = airflow_api_conn_id
        self.horizon = horizon
        self.reprocess_behavior = reprocess_behavior
        self.max_active_runs = max_active_runs
        self.stale_after = stale_after
        self.max_ranges = max_ranges
        self.max_intervals_per_range = max_intervals_per_range
        # BaseOperator.dry_run() is a method: keep the flag under another name
        self.is_dry_run = dry_run

    # -- hooks ----------------------------------------------------------------------------------

    @cached_property
    def checkpoint_hook(self) -> CheckpointHook:
        """The ledger that says which intervals are done."""
        return CheckpointHook(self.selfheal_conn_id, table_prefix=self.table_prefix)

    @cached_property
    def heal_event_hook(self) -> HealEventHook:
        """Where requested backfills are recorded."""
        return HealEventHook(self.selfheal_conn_id, table_prefix=self.table_prefix)

    @cached_property
    def api_hook(self) -> AirflowApiHook:
        """Airflow's REST API: the only way task code may create a backfill."""
        return AirflowApiHook(self.airflow_api_conn_id)

    # -- execution ------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Find the gaps, request backfills for them, and return a JSON-able summary."""
        dag = context["dag"]
        target = self.target_dag_id or dag.dag_id
        own = target == dag.dag_id
        dag_run = context.get("dag_run")
        run_type = getattr(getattr(dag_run, "run_type", None), "value", getattr(dag_run, "run_type", None))
        if own and run_type == "backfill":
            self.log.info("This run is part of a backfill of DAG %s: not looking for more gaps", target)
            return {"pipeline": self.pipeline, "target_dag_id": target, "skipped": "run is a backfill run"}

        timetable = self.target_timetable if self.target_timetable is not None else dag.timetable
        anchor = self.target_start_date
        if anchor is None and own:
            anchor = dag.start_date or self.start_date
        end = utcnow()
        start = self._horizon_start(anchor, end)
        missed = find_gaps(
            self.checkpoint_hook,
            self.pipeline,
            timetable,
            start=start,
            end=end,
            anchor=anchor,
            stale_after=self.stale_after,
        )
        ranges = contiguous_ranges(missed, max_intervals=self.max_intervals_per_range)
        self.log.info(
            "Pipeline %s (DAG %s) between %s and %s: %s missed intervals %s in %s ranges",
            self.pipeline,
            target,
            start.isoformat(),
            end.isoformat(),
            len(missed),
            dict(Counter(m.status for m in missed)),
            len(ranges),
        )
        requested, skipped = self.request_backfills(target, timetable, ranges, context) if ranges else ([], [])
        return {
            "pipeline": self.pipeline,
            "target_dag_id": target,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "gaps": len(missed),
            "gap_statuses": dict(sorted(Counter(m.status for m in missed).items())),
            "ranges_requested": requested,
            "ranges_skipped": skipped,
            "dry_run": self.is_dry_run,
        }

    def _horizon_start(self, anchor: dt.datetime | None, now: dt.datetime) -> dt.datetime:
        candidates = []
        if self.horizon is not None:
            candidates.append(now - self.horizon)
        if anchor is not None:
            candidates.append(as_utc(anchor, argument="start date"))
        if not candidates:
            raise ValueError(
                f"task {self.task_id!r}: the target DAG has no start date; pass horizon= to say how far back to look"
            )
        return max(candidates)  # never before the DAG's start

    def request_backfills(
        self, dag_id: str, timetable: Any, ranges: Sequence[GapRange], context: Mapping[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """
        Request one backfill per range, oldest first; returns ``(requested, skipped)`` descriptions.

        A range covered by an active backfill of ``dag_id`` is skipped; while any backfill of the DAG is
        active (Airflow runs one at a time) the remaining ranges are deferred; a 409 from Airflow (a
        backfill started meanwhile) is a skip too, never a failure.

        :param timetable: the target DAG's timetable, to pick dates that select exactly each range's runs.
        """
        active = [b for b in self.api_hook.list_backfills(dag_id) if b.get("completed_at") is None]
        requested: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        run_id = (context or {}).get("run_id")
        for gap_range in ranges:
            info = gap_range.as_dict()
            covering = _covering(gap_range, active)
            if covering is not None:
                paused = " (paused)" if covering.get("is_paused") else ""
                skipped.append({**info, "reason": f"covered by active backfill {covering.get('id')}{paused}"})
            elif active:
                skipped.append(
                    {
                        **info,
                        "reason": f"deferred: backfill {active[0].get('id')} of this DAG is active and Airflow runs "
                        "one backfill per DAG at a time",
                    }
                )
            elif self.max_ranges is not None and len(requested) >= self.max_ranges:
                skipped.append({**info, "reason": f"deferred: max_ranges={self.max_ranges} reached"})
            else:
                try:
                    from_date, to_date = backfill_dates(timetable, [m.run for m in gap_range.missed])
                except SelfHealError as error:
                    skipped.append({**info, "reason": str(error)})
                    continue
                info.update(from_date=from_date.isoformat(), to_date=to_date.isoformat())
                if self.is_dry_run:
                    requested.append({**info, "backfill_id": None})
                    active.append({"id": "(dry run)", "from_date": info["from_date"], "to_date": info["to_date"]})
                    continue
                backfill, reason = self._create(dag_id, from_date, to_date)
                if backfill is None:
                    skipped.append({**info, "reason": reason})
                    continue
                requested.append({**info, "backfill_id": backfill.get("id")})
                active.append(backfill)
                self.heal_event_hook.record(
                    HEAL_EVENT_KIND,
                    pipeline=self.pipeline,
                    interval=gap_range.interval,
                    dag_id=dag_id,
                    task_id=self.task_id,
                    run_id=run_id,
                    detail={
                        **info,
                        "backfill_id": backfill.get("id"),
                        "reprocess_behavior": self.reprocess_behavior,
                        "max_active_runs": self.max_active_runs,
                    },
                )
        for item in requested:
            self.log.info(
                "%s backfill %s of DAG %s: %s to %s (%s intervals %s)",
                "Would request" if self.is_dry_run else "Requested",
                item["backfill_id"],
                dag_id,
                item["from_date"],
                item["to_date"],
                item["intervals"],
                item["statuses"],
            )
        for item in skipped:
            self.log.info(
                "Skipped runs %s to %s: %s", item["first_logical_date"], item["last_logical_date"], item["reason"]
            )
        return requested, skipped

    def _create(self, dag_id: str, from_date: dt.datetime, to_date: dt.datetime) -> tuple[dict[str, Any] | None, str]:
        """Create one backfill; a 409 (another backfill is active) gives ``(None, reason)`` instead of an error."""
        try:
            backfill = self.api_hook.create_backfill(
                dag_id,
                from_date=from_date.isoformat(),
                to_date=to_date.isoformat(),
                reprocess_behavior=self.reprocess_behavior,
                max_active_runs=self.max_active_runs,
            )
        except AirflowApiError as error:
            status = _status_code(error)
            if status == 409:
                return None, f"a backfill of this DAG is already running (Airflow answered 409): {error}"
            if status in (400, 422) and "no runs to create" in str(error).lower():
                # Airflow saw no due run there (e.g. the last window ends this very second): retry next time.
                self.log.warning("Airflow found no run to create for %s: %s", dag_id, error)
                return None, f"Airflow found no run to create: {error}"
            raise
        return backfill, ""
