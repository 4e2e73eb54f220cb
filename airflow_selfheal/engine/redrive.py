"""
Redrive: dead letters run again through the pipeline's own transform and write path.

Letters are taken oldest first (lowest id), in batches claimed atomically, so concurrent redrives
never share a letter. Each batch is grouped by data interval; for every interval one transaction
writes the records by key (an upsert, whatever the pipeline's strategy, so a repeated redrive never
duplicates), resolves the letters that succeeded and records a ledger version with reason
``redrive``. Only intervals that are done are redriven: an interval still missing or failed will be
reprocessed from its source, which resolves its letters anyway.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from airflow_selfheal import metrics
from airflow_selfheal.engine.engine import IntervalEngine
from airflow_selfheal.engine.models import Checksum, RunContext
from airflow_selfheal.engine.sinks import Pending, RowRejected, SinkSpec, SqlSink
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.letters import DeadLetter
from airflow_selfheal.store.schema import DONE
from airflow_selfheal.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass
class RedriveSummary:
    """What a redrive did; the task's XCom."""

    pipeline: str
    claimed: int = 0
    resolved: int = 0
    failed_again: int = 0
    parked: int = 0
    released: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    intervals: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RedriveSettings:
    """
    Limits of one redrive.

    :param max_records: most letters one run takes.
    :param batch_size: letters claimed (and written) per batch.
    :param records_per_second: rate limit, so a recovering dependency is not flooded (``None``: no limit).
    :param max_attempts: failures after which a letter is parked.
    """

    max_records: int = 1000
    batch_size: int = 100
    records_per_second: float | None = None
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_records < 1:
            raise ValueError(f"max_records={self.max_records} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.records_per_second is not None and self.records_per_second <= 0:
            raise ValueError(f"records_per_second={self.records_per_second} must be positive")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be at least 1")


class Redriver:
    """Runs dead letters of ``engine``'s pipeline again; see the module docstring for the order of things."""

    def __init__(self, engine: IntervalEngine, settings: RedriveSettings) -> None:
        spec = engine.sink.spec
        if not spec.key_columns:
            raise ValueError(
                f"pipeline {engine.settings.pipeline!r} has no key_columns: a redrive needs them to write "
                "records idempotently (give the pipeline's operator key_columns)"
            )
        self.engine = engine
        self.settings = settings
        keyed = SinkSpec(
            table=spec.table,
            write_strategy="upsert",
            interval_column=spec.interval_column,
            timestamp_column=spec.timestamp_column,
            key_columns=spec.key_columns,
            target_fields=spec.target_fields,
        )
        self.sink = SqlSink(keyed, classify_transient=engine.classifier.is_transient)

    def run(
        self, *, context: RunContext, claim_filters: dict[str, Any] | None = None, guard: Any = None
    ) -> RedriveSummary:
        """
        Redrive until ``max_records`` letters were taken or none are left.

        :param guard: optional ``callable() -> context manager`` around each batch (the circuit breaker).
        """
        started = time.monotonic()
        run_started = utcnow()
        summary = RedriveSummary(pipeline=self.engine.settings.pipeline)
        filters = dict(claim_filters or {})
        user_older_than = filters.pop("older_than", None) or dt.timedelta(0)
        while summary.claimed < self.settings.max_records:
            batch_started = time.monotonic()
            limit = min(self.settings.batch_size, self.settings.max_records - summary.claimed)
            # A letter that failed again in this run was last seen after it started: not twice per run.
            filters["older_than"] = max(user_older_than, utcnow() - run_started)
            if guard is None:
                taken = self._batch(limit, filters, context, summary)
            else:
                with guard():
                    taken = self._batch(limit, filters, context, summary)
            if not taken:
                break
            self._respect_rate(taken, time.monotonic() - batch_started)
        summary.seconds = round(time.monotonic() - started, 3)
        tags = {"pipeline": summary.pipeline}
        metrics.incr("redrive_resolved", summary.resolved, tags=tags)
        metrics.incr("redrive_failed", summary.failed_again, tags=tags)
        self.engine.events.record(
            "redrive",
            pipeline=summary.pipeline,
            dag_id=context.dag_id,
            task_id=context.task_id,
            run_id=context.run_id,
            detail=summary.as_dict(),
        )
        log.info("Redrive of %s: %s", summary.pipeline, summary.as_dict())
        return summary

    def _respect_rate(self, records: int, elapsed: float) -> None:
        rate = self.settings.records_per_second
        if rate is not None:
            time.sleep(max(0.0, records / rate - elapsed))

    def _batch(self, limit: int, filters: dict[str, Any], context: RunContext, summary: RedriveSummary) -> int:
        letters = self.engine.dead_letters.claim_for_redrive(self.engine.settings.pipeline, limit=limit, **filters)
        summary.claimed += len(letters)
        groups: dict[Interval | None, list[DeadLetter]] = {}
        for letter in letters:
            groups.setdefault(letter.interval, []).append(letter)
        for interval, group in groups.items():
            try:
                self._redrive_interval(interval, group, context, summary)
            except Exception:
                # Hand the letters back untouched (attempts unchanged): the batch failed, not the records.
                summary.released += self.engine.dead_letters.requeue([x.id for x in group], reset_attempts=False)
                raise
        return len(letters)

    def _redrive_interval(
        self, interval: Interval | None, letters: Sequence[DeadLetter], context: RunContext, summary: RedriveSummary
    ) -> None:
        engine = self.engine
        pipeline = engine.settings.pipeline
        if interval is None:
            raise ValueError(f"dead letters {[x.id for x in letters]} carry no interval and cannot be redriven")
        entry = engine.ledger.get(pipeline, interval)
        if entry is None or entry.status != DONE:
            # Reprocessing the interval from its source will settle these letters.
            summary.released += engine.dead_letters.requeue([x.id for x in letters], reset_attempts=False)
            return
        claim = engine.ledger.try_claim(
            pipeline,
            interval,
            run_id=context.run_id,
            try_number=context.try_number,
            reprocess=True,
            stale_after=engine.settings.stale_after,
        )
        if claim is None:  # the interval is being processed right now; its run settles what it can
            summary.released += engine.dead_letters.requeue([x.id for x in letters], reset_attempts=False)
            return
        try:
            self._write(interval, letters, claim, entry, context, summary)
        except BaseException:
            engine.ledger.release(claim)
            raise
        if str(interval) not in summary.intervals:
            summary.intervals.append(str(interval))

    def _write(
        self,
        interval: Interval,
        letters: Sequence[DeadLetter],
        claim: Any,
        entry: Any,
        context: RunContext,
        summary: RedriveSummary,
    ) -> None:
        engine = self.engine
        failures: dict[int, BaseException] = {}
        with engine.destination_engine.begin() as conn:
            table = self.sink.table(conn)
            pending: list[Pending] = []
            for letter in letters:
                if letter.payload_truncated:
                    failures[letter.id] = ValueError("the stored payload was truncated; it cannot be redriven")
                    continue
                try:
                    rows = [self.sink.to_row(out, interval, table) for out in engine.transformed(letter.payload)]
                except RowRejected as error:
                    failures[letter.id] = error
                    continue
                except Exception as error:
                    if engine.classifier.is_transient(error):
                        raise
                    failures[letter.id] = error
                    continue
                pending.extend(Pending(row, letter) for row in rows)
            written, rejected = self.sink.write(conn, pending)
            for item, refusal in rejected:
                failures.setdefault(item.source.id, refusal)
            resolved = [x for x in letters if x.id not in failures]
            checksum = _extend_checksum(entry.checksum, [p.row for p in written if p.source.id not in failures])
            store = conn if engine.same_database else None
            if store is not None:
                self._settle(resolved, letters, failures, claim, entry, checksum, len(written), summary, store)
        if not engine.same_database:
            with engine.ledger.engine.begin() as store_conn:
                self._settle(resolved, letters, failures, claim, entry, checksum, len(written), summary, store_conn)

    def _settle(
        self,
        resolved: list[DeadLetter],
        letters: Sequence[DeadLetter],
        failures: dict[int, BaseException],
        claim: Any,
        entry: Any,
        checksum: str,
        written: int,
        summary: RedriveSummary,
        conn: sa.Connection,
    ) -> None:
        engine = self.engine
        summary.resolved += engine.dead_letters.redrive_succeeded(resolved, connection=conn)
        for letter in letters:
            if letter.id in failures:
                status = engine.dead_letters.redrive_failed(
                    letter, failures[letter.id], max_attempts=self.settings.max_attempts, connection=conn
                )
                summary.failed_again += 1
                summary.parked += status == "parked"
        summary.rows_written += written
        engine.ledger.commit(
            claim,
            reason="redrive",
            rows_read=entry.rows_read,
            rows_written=(entry.rows_written or 0) + written,
            rows_dead_lettered=max(0, (entry.rows_dead_lettered or 0) - len(resolved)),
            checksum=checksum,
            connection=conn,
        )


def _extend_checksum(previous: str | None, rows: Sequence[dict[str, Any]]) -> str:
    """The interval's checksum with ``rows`` added (the checksum is a sum, so it extends)."""
    checksum = Checksum.resume(previous)
    checksum.add_many(rows)
    return checksum.hexdigest()
