"""The checkpoint ledger: which data intervals a pipeline has processed, and every version of each."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.exceptions import ClaimLostError
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.payload import from_jsonable, to_jsonable
from airflow_selfheal.store.schema import DONE, FAILED, RUNNING
from airflow_selfheal.store.types import utcnow

DEFAULT_STALE_AFTER = dt.timedelta(hours=1)


@dataclass(frozen=True)
class IntervalClaim:
    """Proof that this worker owns an interval until it commits or fails it."""

    pipeline: str
    interval: Interval
    token: str
    previous_status: str | None
    run_id: str | None
    try_number: int | None


@dataclass(frozen=True)
class LedgerEntry:
    """One interval's row in the ledger."""

    pipeline: str
    interval: Interval
    status: str
    version: int
    rows_read: int | None
    rows_written: int | None
    rows_dead_lettered: int | None
    checksum: str | None
    reason: str | None
    run_id: str | None
    try_number: int | None
    claimed_at: dt.datetime | None
    committed_at: dt.datetime | None
    updated_at: dt.datetime
    error: str | None


@dataclass(frozen=True)
class IntervalVersion:
    """One committed write of an interval."""

    version: int
    rows_read: int | None
    rows_written: int | None
    rows_dead_lettered: int | None
    checksum: str | None
    reason: str
    run_id: str | None
    try_number: int | None
    committed_at: dt.datetime


@dataclass(frozen=True)
class Gap:
    """An interval (or a stretch of time) that still needs processing, and why."""

    interval: Interval
    status: str  # "missing", "failed" or "stale" (a running claim whose worker is gone)


class CheckpointHook(SelfHealStoreHook):
    """
    The ledger of processed data intervals: claims, commits, failures, the watermark and versions.

    Ledger state machine per (pipeline, interval): *missing* → ``running`` (claim) → ``done``
    (commit) or ``failed`` (fail). ``failed`` and stale ``running`` rows can be claimed again;
    ``done`` rows only with ``reprocess=True``, and each later commit adds a version.
    """

    hook_name = "Self-heal checkpoint ledger"

    # -- claiming -----------------------------------------------------------------------------

    def try_claim(
        self,
        pipeline: str,
        interval: Interval,
        *,
        run_id: str | None = None,
        try_number: int | None = None,
        reprocess: bool = False,
        stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
    ) -> IntervalClaim | None:
        """
        Atomically claim ``interval``; return the claim, or ``None`` when someone else may not be displaced.

        Exactly one of many racing workers wins: a new interval is won by the single INSERT that
        succeeds, an existing one by the single conditional UPDATE that matches.

        :param reprocess: also claim a ``done`` interval (a rerun that will write a new version).
        :param stale_after: a ``running`` claim older than this is presumed dead and may be taken over.
            A running claim of an earlier try of the same ``run_id`` is taken over at once.
        """
        table = self.tables.intervals
        token = str(uuid.uuid4())
        now = utcnow()
        claim_values = {
            "status": RUNNING,
            "claim_token": token,
            "claimed_at": now,
            "updated_at": now,
            "run_id": run_id,
            "try_number": try_number,
            "error": None,
        }
        key = _key_clause(table, pipeline, interval)
        try:
            with self.begin() as conn:
                conn.execute(
                    sa.insert(table).values(
                        pipeline=pipeline,
                        interval_start=interval.start,
                        interval_end=interval.end,
                        version=0,
                        **claim_values,
                    )
                )
            return IntervalClaim(pipeline, interval, token, None, run_id, try_number)
        except sa.exc.IntegrityError:
            pass  # the row exists: compete for it with a conditional update below

        claimable = [
            table.c.status == FAILED,
            sa.and_(table.c.status == RUNNING, table.c.claimed_at < now - stale_after),
        ]
        if run_id is not None and try_number is not None:
            # Airflow starts a new try only once the previous one has ended (or was declared dead),
            # so a running claim of an earlier try of the same run is an orphan: take it over now.
            claimable.append(
                sa.and_(table.c.status == RUNNING, table.c.run_id == run_id, table.c.try_number < try_number)
            )
        if reprocess:
            claimable.append(table.c.status == DONE)
        with self.begin() as conn:
            previous = conn.execute(sa.select(table.c.status).where(key)).scalar()
            result = conn.execute(sa.update(table).where(key, sa.or_(*claimable)).values(**claim_values))
            if result.rowcount != 1:
                return None
        return IntervalClaim(pipeline, interval, token, previous, run_id, try_number)

    def commit(
        self,
        claim: IntervalClaim,
        *,
        reason: str,
        rows_read: int | None = None,
        rows_written: int | None = None,
        rows_dead_lettered: int | None = None,
        checksum: str | None = None,
        connection: sa.Connection | None = None,
    ) -> int:
        """
        Mark the claimed interval done and record a new version; returns the version number.

        :param connection: commit inside the caller's transaction (same database as the data), so
            data and checkpoint become visible together or not at all.
        :raises ClaimLostError: our claim went stale and another worker took the interval.
        """
        table, versions = self.tables.intervals, self.tables.interval_versions
        now = utcnow()
        with self.begin(connection) as conn:
            current = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(versions.c.version), 0)).where(
                    _key_clause(versions, claim.pipeline, claim.interval)
                )
            ).scalar_one()
            version = int(current) + 1
            counts = {
                "rows_read": rows_read,
                "rows_written": rows_written,
                "rows_dead_lettered": rows_dead_lettered,
                "checksum": checksum,
            }
            result = conn.execute(
                sa.update(table)
                .where(
                    _key_clause(table, claim.pipeline, claim.interval),
                    table.c.claim_token == claim.token,
                    table.c.status == RUNNING,
                )
                .values(
                    status=DONE,
                    version=version,
                    reason=reason,
                    committed_at=now,
                    updated_at=now,
                    claim_token=None,
                    error=None,
                    **counts,
                )
            )
            if result.rowcount != 1:
                raise ClaimLostError(
                    f"pipeline {claim.pipeline!r} interval {claim.interval}: our claim was taken over by another "
                    "worker (it went stale); nothing was committed"
                )
            conn.execute(
                sa.insert(versions).values(
                    pipeline=claim.pipeline,
                    interval_start=claim.interval.start,
                    interval_end=claim.interval.end,
                    version=version,
                    reason=reason,
                    run_id=claim.run_id,
                    try_number=claim.try_number,
                    committed_at=now,
                    **counts,
                )
            )
        return version

    def fail(self, claim: IntervalClaim, *, error: str, connection: sa.Connection | None = None) -> bool:
        """Mark the claimed interval failed with ``error``; returns False if the claim was already lost."""
        table = self.tables.intervals
        now = utcnow()
        with self.begin(connection) as conn:
            result = conn.execute(
                sa.update(table)
                .where(_key_clause(table, claim.pipeline, claim.interval), table.c.claim_token == claim.token)
                .values(status=FAILED, error=error[:10000], updated_at=now, claim_token=None)
            )
        return result.rowcount == 1

    def release(self, claim: IntervalClaim, *, connection: sa.Connection | None = None) -> bool:
        """
        Give a claim back without a new version: the interval returns to the status it had.

        For work that claimed an interval and then wrote nothing (e.g. a redrive that was refused).
        A never-seen interval's row is removed, so it counts as missing again.
        """
        table = self.tables.intervals
        key = sa.and_(_key_clause(table, claim.pipeline, claim.interval), table.c.claim_token == claim.token)
        with self.begin(connection) as conn:
            if claim.previous_status is None:
                result = conn.execute(sa.delete(table).where(key))
            else:
                result = conn.execute(
                    sa.update(table)
                    .where(key)
                    .values(status=claim.previous_status, claim_token=None, updated_at=utcnow())
                )
        return result.rowcount == 1

    # -- reading ------------------------------------------------------------------------------

    def get(self, pipeline: str, interval: Interval) -> LedgerEntry | None:
        """The ledger row of one interval, or ``None`` if it was never claimed."""
        table = self.tables.intervals
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(_key_clause(table, pipeline, interval))).mappings().first()
        return None if row is None else _entry(row)

    def entries(
        self,
        pipeline: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        statuses: Sequence[str] | None = None,
        connection: sa.Connection | None = None,
    ) -> list[LedgerEntry]:
        """
        Ledger rows of ``pipeline`` whose interval lies within ``[start, end]``, oldest first.

        :param connection: read inside the caller's transaction (SQLite cannot open a second one).
        """
        table = self.tables.intervals
        query = sa.select(table).where(table.c.pipeline == pipeline)
        if start is not None:
            query = query.where(table.c.interval_start >= Interval(start, start).start)
        if end is not None:
            query = query.where(table.c.interval_end <= Interval(end, end).end)
        if statuses:
            query = query.where(table.c.status.in_(list(statuses)))
        with self.begin(connection) as conn:
            rows = conn.execute(query.order_by(table.c.interval_start, table.c.interval_end)).mappings().all()
        return [_entry(row) for row in rows]

    def pipelines(self) -> list[str]:
        """Every pipeline that has a ledger row."""
        table = self.tables.intervals
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(table.c.pipeline).distinct().order_by(table.c.pipeline)).scalars())

    def watermark(self, pipeline: str, *, origin: dt.datetime | None = None) -> dt.datetime | None:
        """
        The point up to which ``pipeline`` is complete: the end of the contiguous run of done intervals
        that starts at ``origin`` (default: the pipeline's earliest ledger interval).

        Everything before the watermark is done; the first gap or unfinished interval stops it.
        Returns ``None`` when nothing is done from the origin on.
        """
        done = self.entries(pipeline, statuses=[DONE])
        if not done:
            return None
        first_start = min(e.interval.start for e in self.entries(pipeline))
        cursor = Interval(origin, origin).start if origin is not None else first_start
        mark: dt.datetime | None = None
        for entry in done:  # sorted by start
            if entry.interval.end <= cursor:
                continue
            if entry.interval.start > cursor:
                break
            cursor = entry.interval.end
            mark = cursor
        return mark

    def newest_done(self, pipeline: str) -> LedgerEntry | None:
        """The done interval that ends last, wherever it lies (the watermark stops at gaps; this does not)."""
        table = self.tables.intervals
        query = (
            sa.select(table)
            .where(table.c.pipeline == pipeline, table.c.status == DONE)
            .order_by(table.c.interval_end.desc(), table.c.interval_start.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _entry(row)

    def gaps(
        self,
        pipeline: str,
        *,
        start: dt.datetime,
        end: dt.datetime,
        expected: Iterable[Interval] | None = None,
        stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
    ) -> list[Gap]:
        """
        What is missing, failed or stale between ``start`` and ``end``, oldest first.

        With ``expected`` (the intervals the DAG's timetable says should exist) each expected interval
        that is not done is reported. Without it, failed and stale intervals are reported along with
        every stretch of ``[start, end)`` that no ledger interval covers.
        """
        window = Interval(start, end)
        entries = self.entries(pipeline)
        now = utcnow()

        def status_of(entry: LedgerEntry) -> str | None:
            if entry.status == FAILED:
                return "failed"
            if entry.status == RUNNING and entry.claimed_at is not None and entry.claimed_at < now - stale_after:
                return "stale"
            return None

        if expected is not None:
            by_key = {e.interval: e for e in entries}
            found: list[Gap] = []
            for interval in sorted(expected):
                if interval.start < window.start or interval.end > window.end:
                    continue
                entry = by_key.get(interval)
                if entry is None:
                    found.append(Gap(interval, "missing"))
                elif (status := status_of(entry)) is not None:
                    found.append(Gap(interval, status))
            return found

        gaps: list[Gap] = []
        cursor = window.start
        for entry in entries:
            iv = entry.interval
            if iv.end <= window.start or iv.start >= window.end:
                continue
            if iv.start > cursor:
                gaps.append(Gap(Interval(cursor, min(iv.start, window.end)), "missing"))
            if (status := status_of(entry)) is not None:
                gaps.append(Gap(iv, status))
            cursor = max(cursor, iv.end)
        if cursor < window.end:
            gaps.append(Gap(Interval(cursor, window.end), "missing"))
        return gaps

    def versions(self, pipeline: str, interval: Interval) -> list[IntervalVersion]:
        """Every committed version of ``interval``, oldest first."""
        table = self.tables.interval_versions
        query = sa.select(table).where(_key_clause(table, pipeline, interval)).order_by(table.c.version)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            IntervalVersion(
                version=r["version"],
                rows_read=r["rows_read"],
                rows_written=r["rows_written"],
                rows_dead_lettered=r["rows_dead_lettered"],
                checksum=r["checksum"],
                reason=r["reason"],
                run_id=r["run_id"],
                try_number=r["try_number"],
                committed_at=r["committed_at"],
            )
            for r in rows
        ]

    # -- archive of replaced rows (keep_versions) ----------------------------------------------

    def archive_rows(
        self,
        pipeline: str,
        interval: Interval,
        *,
        version: int,
        rows: Sequence[dict[str, Any]],
        keep_versions: int,
        connection: sa.Connection | None = None,
    ) -> None:
        """
        Keep ``rows`` (the destination's rows of ``version``, about to be replaced) for rollback.

        Idempotent per version, so a crashed attempt that archived already does not archive twice;
        archives older than the newest ``keep_versions`` are pruned.
        """
        table = self.tables.archived_rows
        key = _key_clause(table, pipeline, interval)
        with self.begin(connection) as conn:
            conn.execute(sa.delete(table).where(key, table.c.version == version))
            if rows:
                conn.execute(
                    sa.insert(table),
                    [
                        {
                            "pipeline": pipeline,
                            "interval_start": interval.start,
                            "interval_end": interval.end,
                            "version": version,
                            "row_json": json.dumps(to_jsonable(row), sort_keys=True),
                        }
                        for row in rows
                    ],
                )
            conn.execute(sa.delete(table).where(key, table.c.version <= version - keep_versions))

    def archived_rows(self, pipeline: str, interval: Interval, version: int) -> list[dict[str, Any]] | None:
        """The rows ``version`` wrote, or ``None`` if that version is not in the archive."""
        table = self.tables.archived_rows
        query = (
            sa.select(table.c.row_json)
            .where(_key_clause(table, pipeline, interval), table.c.version == version)
            .order_by(table.c.id)
        )
        with self.engine.connect() as conn:
            texts = list(conn.execute(query).scalars())
        if not texts:
            # An empty version archives no rows; tell it apart from a pruned one by the history.
            known = any(v.version == version and (v.rows_written or 0) == 0 for v in self.versions(pipeline, interval))
            return [] if known else None
        return [from_jsonable(json.loads(text)) for text in texts]


def _key_clause(table: sa.Table, pipeline: str, interval: Interval) -> sa.ColumnElement[bool]:
    return sa.and_(
        table.c.pipeline == pipeline,
        table.c.interval_start == interval.start,
        table.c.interval_end == interval.end,
    )


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(
        pipeline=row["pipeline"],
        interval=Interval(row["interval_start"], row["interval_end"]),
        status=row["status"],
        version=row["version"],
        rows_read=row["rows_read"],
        rows_written=row["rows_written"],
        rows_dead_lettered=row["rows_dead_lettered"],
        checksum=row["checksum"],
        reason=row["reason"],
        run_id=row["run_id"],
        try_number=row["try_number"],
        claimed_at=row["claimed_at"],
        committed_at=row["committed_at"],
        updated_at=row["updated_at"],
        error=row["error"],
    )
