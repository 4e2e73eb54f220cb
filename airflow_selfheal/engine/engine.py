"""
The path of one interval, top to bottom: claim, read in chunks, transform, dead-letter, write
idempotently, record the version, commit the checkpoint. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import sqlalchemy as sa

from airflow_selfheal import metrics
from airflow_selfheal.engine.models import Checksum, EngineSettings, RunContext, RunSummary
from airflow_selfheal.engine.sinks import Pending, RowRejected, SinkSpec, SqlSink
from airflow_selfheal.engine.sources import RecordSource, sql_engine
from airflow_selfheal.exceptions import (
    DeadLetterCeilingExceeded,
    IntervalBusyError,
    OrderingGapError,
    SelfHealError,
)
from airflow_selfheal.hooks.checkpoint import CheckpointHook, IntervalClaim
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.dialects import tune_engine
from airflow_selfheal.store.letters import FailedRecord
from airflow_selfheal.store.payload import encode_payload, record_identity
from airflow_selfheal.store.schema import DONE, PENDING, REDRIVING

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any]


@dataclass
class _Attempt:
    rows_read: int = 0
    written: int = 0
    dead: list[FailedRecord] = field(default_factory=list)
    checksum: Checksum = field(default_factory=Checksum)
    resolved_identities: list[str] = field(default_factory=list)


class IntervalEngine:
    """
    Processes data intervals exactly once in effect, however often they are run.

    :param settings: see :class:`EngineSettings`.
    :param source: where records come from (:class:`~airflow_selfheal.engine.sources.SqlSource`,
        :class:`~airflow_selfheal.engine.sources.CallableSource`).
    :param sink: where and how they are written.
    :param destination_conn_id: connection of the destination table.
    :param transform: per-record function returning a record, a list of records, or ``None`` to drop it.
    :param selfheal_conn_id: the state store (ledger, dead letters, events).
    :param classifier: decides transient vs permanent (default: the built-in rules).
    :param retry_settings: in-task retries of transient batch errors.
    """

    def __init__(
        self,
        *,
        settings: EngineSettings,
        source: RecordSource,
        sink: SinkSpec,
        destination_conn_id: str,
        transform: Transform | None = None,
        selfheal_conn_id: str | None = None,
        table_prefix: str | None = None,
        schema: str | None = None,
        classifier: Any = None,
        retry_settings: Any = None,
    ) -> None:
        from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER
        from airflow_selfheal.healing.retry import RetrySettings

        self.settings = settings
        self.source = source
        self.transform = transform
        self.classifier = classifier or DEFAULT_CLASSIFIER
        self.retry_settings = retry_settings or RetrySettings()
        self.destination_conn_id = destination_conn_id
        self.ledger = CheckpointHook(selfheal_conn_id, table_prefix=table_prefix, schema=schema)
        self.dead_letters = DeadLetterHook(selfheal_conn_id, table_prefix=table_prefix, schema=schema)
        self.events = HealEventHook(selfheal_conn_id, table_prefix=table_prefix, schema=schema)
        self.sink = SqlSink(sink, classify_transient=self.classifier.is_transient)
        self._open_letters_checked: tuple[float, bool] | None = None

    # -- engines --------------------------------------------------------------------------------

    @cached_property
    def destination_engine(self) -> sa.Engine:
        """The destination's engine; the state store's own when both are one database (one pool, one transaction)."""
        if self.destination_conn_id == self.ledger.selfheal_conn_id:
            return self.ledger.engine
        engine = sql_engine(self.destination_conn_id)
        if str(engine.url) == str(self.ledger.engine.url):
            engine.dispose()
            return self.ledger.engine
        return tune_engine(engine)

    @cached_property
    def same_database(self) -> bool:
        """Destination and state store share a database: data, version and checkpoint commit together."""
        return self.destination_engine is self.ledger.engine

    # -- the path of one interval ---------------------------------------------------------------

    def run(self, interval: Interval, context: RunContext | None = None) -> RunSummary:
        """Process ``interval``; returns the summary, raises the error that stopped it."""
        ctx = context or RunContext()
        started = time.monotonic()
        summary = RunSummary(self.settings.pipeline, interval.start.isoformat(), interval.end.isoformat(), ctx.reason)
        self._check_order(interval)
        claim = self.ledger.try_claim(
            self.settings.pipeline,
            interval,
            run_id=ctx.run_id,
            try_number=ctx.try_number,
            reprocess=True,
            stale_after=self.settings.stale_after,
        )
        if claim is None:
            raise IntervalBusyError(
                f"pipeline {self.settings.pipeline!r} interval {interval} is being processed by another worker "
                f"(live claim); it will be retried"
            )
        try:
            attempt = self._run_with_retries(claim, interval, ctx, summary)
        except BaseException as error:
            self._on_failure(claim, interval, ctx, error)
            raise
        summary.rows_read = attempt.rows_read
        summary.rows_written = attempt.written
        summary.rows_dead_lettered = len(attempt.dead)
        summary.checksum = attempt.checksum.hexdigest()
        summary.seconds = round(time.monotonic() - started, 3)
        tags = {"pipeline": self.settings.pipeline}
        metrics.incr("rows_written", attempt.written, tags=tags)
        metrics.incr("dead_letters", len(attempt.dead), tags=tags)
        if attempt.dead:
            self._open_letters_checked = (time.monotonic(), True)  # a later interval may resolve them
            self._event("dead_lettered", interval, ctx, {"count": len(attempt.dead), "version": summary.version})
        log.info("selfheal summary: %s", summary.line())
        return summary

    def _run_with_retries(
        self, claim: IntervalClaim, interval: Interval, ctx: RunContext, summary: RunSummary
    ) -> _Attempt:
        from airflow_selfheal.healing.retry import RetryAttempt, retrying

        def on_retry(attempt: RetryAttempt) -> None:
            summary.retries += 1
            metrics.incr("retries", tags={"pipeline": self.settings.pipeline})
            self._event(
                "retry",
                interval,
                ctx,
                {
                    "attempt": attempt.attempt,
                    "delay": attempt.delay,
                    "error_class": type(attempt.error).__name__,
                    "error": str(attempt.error)[:500],
                },
            )

        result: _Attempt | None = None
        for tenacity_attempt in retrying(self.retry_settings, self.classifier, on_retry=on_retry):
            with tenacity_attempt:
                result = self._attempt(claim, interval, ctx, summary)
        assert result is not None
        return result

    def _attempt(self, claim: IntervalClaim, interval: Interval, ctx: RunContext, summary: RunSummary) -> _Attempt:
        """One transaction on the destination: everything of the interval, or nothing."""
        attempt = _Attempt()
        track_resolutions = self._has_open_letters()
        previous = self.ledger.get(self.settings.pipeline, interval) if self.settings.keep_versions else None
        with self.destination_engine.begin() as conn:
            store_conn = conn if self.same_database else None
            if self.settings.keep_versions and previous is not None and previous.version > 0:
                self.ledger.archive_rows(
                    self.settings.pipeline,
                    interval,
                    version=previous.version,
                    rows=self.sink.current_rows(conn, interval),
                    keep_versions=self.settings.keep_versions,
                    connection=store_conn,
                )
            self.sink.clear_interval(conn, interval)
            for chunk in self.source.chunks(interval, self.settings.chunk_size):
                attempt.rows_read += len(chunk)
                self._process_chunk(conn, chunk, interval, ctx, attempt, track_resolutions)
                self._check_ceiling(attempt, interval, final=False)
            self._check_ceiling(attempt, interval, final=True)
            self._check_order(interval, connection=store_conn)
            if self.same_database:
                summary.version = self._record(claim, attempt, ctx, conn)
        if not self.same_database:
            # The destination committed first: a crash before the next line leaves a stale claim,
            # and the rerun's replace/upsert rewrites the same rows (see docs/architecture.md).
            with self.ledger.engine.begin() as store:
                summary.version = self._record(claim, attempt, ctx, store)
        return attempt

    def _has_open_letters(self) -> bool:
        """Whether any letter could be resolved by this run (asked at most once a minute per engine)."""
        now = time.monotonic()
        if self._open_letters_checked is None or now - self._open_letters_checked[0] > 60:
            count = self.dead_letters.count(pipeline=self.settings.pipeline, statuses=[PENDING, REDRIVING])
            self._open_letters_checked = (now, count > 0)
        return self._open_letters_checked[1]

    def _record(self, claim: IntervalClaim, attempt: _Attempt, ctx: RunContext, conn: sa.Connection) -> int:
        self.dead_letters.add(attempt.dead, connection=conn)
        if attempt.resolved_identities:
            resolved = self.dead_letters.resolve_records(
                self.settings.pipeline, attempt.resolved_identities, connection=conn
            )
            if resolved:
                self.events.record(
                    "dead_letters_resolved",
                    pipeline=self.settings.pipeline,
                    interval=claim.interval,
                    run_id=ctx.run_id,
                    detail={"count": resolved},
                    connection=conn,
                )
        return self.ledger.commit(
            claim,
            reason=ctx.reason,
            rows_read=attempt.rows_read,
            rows_written=attempt.written,
            rows_dead_lettered=len(attempt.dead),
            checksum=attempt.checksum.hexdigest(),
            connection=conn,
        )

    def _process_chunk(
        self,
        conn: sa.Connection,
        chunk: list[Any],
        interval: Interval,
        ctx: RunContext,
        attempt: _Attempt,
        track_resolutions: bool,
    ) -> None:
        table = self.sink.table(conn)
        to_row = self.sink.to_row
        pending: list[Pending] = []
        for record in chunk:
            try:
                if self.transform is None:  # the common catch-up case: skip the per-record generator
                    pending.append(Pending(to_row(record, interval, table), record))
                    continue
                for out in self.transformed(record):
                    pending.append(Pending(to_row(out, interval, table), record))
            except RowRejected as error:
                attempt.dead.append(self._failed(record, error, "write", interval, ctx))
            except Exception as error:
                if self.classifier.is_transient(error):
                    raise  # e.g. a lookup inside the transform timed out: retry the attempt
                attempt.dead.append(self._failed(record, error, "transform", interval, ctx))
        written, rejected = self.sink.write(conn, pending)
        attempt.checksum.add_many(item.row for item in written)
        attempt.written += len(written)
        for item, refusal in rejected:
            attempt.dead.append(self._failed(item.source, refusal, "write", interval, ctx))
        if track_resolutions:
            sources = {id(item.source): item.source for item in written}
            attempt.resolved_identities.extend(self.identity(source) for source in sources.values())

    def transformed(self, record: Any) -> Iterable[Any]:
        if self.transform is None:
            return (record,)
        out = self.transform(record)
        if out is None:
            return ()
        if isinstance(out, list):
            return out
        return (out,)

    def record_key(self, record: Any) -> Any:
        """The key of a source record (its key_columns values), or ``None``: names its dead letter."""
        keys = self.sink.spec.key_columns
        if keys and isinstance(record, Mapping) and all(k in record for k in keys):
            return record[keys[0]] if len(keys) == 1 else [record[k] for k in keys]
        return None

    def identity(self, record: Any) -> str:
        """The dead-letter identity of a source record (key, else content hash)."""
        key = self.record_key(record)
        sha = "" if key is not None else encode_payload(record).sha256
        return record_identity(key, sha)

    def _failed(
        self, record: Any, error: BaseException, stage: str, interval: Interval, ctx: RunContext
    ) -> FailedRecord:
        return FailedRecord(
            pipeline=self.settings.pipeline,
            payload=record,
            error=error,
            stage=stage,
            record_key=self.record_key(record),
            interval=interval,
            dag_id=ctx.dag_id,
            task_id=ctx.task_id,
            run_id=ctx.run_id,
        )

    # -- guards ---------------------------------------------------------------------------------

    def _check_ceiling(self, attempt: _Attempt, interval: Interval, *, final: bool) -> None:
        dead = len(attempt.dead)
        s = self.settings
        over_count = s.max_dead_letters is not None and dead > s.max_dead_letters
        over_ratio = (
            final
            and s.max_dead_letter_ratio is not None
            and attempt.rows_read > 0
            and dead > s.dead_letter_grace
            and dead / attempt.rows_read > s.max_dead_letter_ratio
        )
        if over_count or over_ratio:
            sample = attempt.dead[0]
            raise DeadLetterCeilingExceeded(
                f"pipeline {s.pipeline!r} interval {interval}: {dead} of {attempt.rows_read} records failed "
                f"(ceiling: ratio {s.max_dead_letter_ratio}, count {s.max_dead_letters}); a bug is likely, so the "
                f"interval was not committed and nothing was dead-lettered. First error at stage {sample.stage}: "
                f"{type(sample.error).__name__}: {sample.error}"
            )

    def _check_order(self, interval: Interval, *, connection: sa.Connection | None = None) -> None:
        if not self.settings.ordered:
            return
        entries = self.ledger.entries(self.settings.pipeline, connection=connection)
        earlier = [e for e in entries if e.interval.end <= interval.start]
        origin = self.settings.ordered_origin
        if origin is None and not earlier:
            return
        cursor = Interval(origin, origin).start if origin is not None else earlier[0].interval.start
        for entry in earlier:
            if entry.interval.end <= cursor:
                continue
            if entry.interval.start > cursor:
                break
            if entry.status != DONE:
                raise OrderingGapError(
                    f"ordered pipeline {self.settings.pipeline!r}: earlier interval {entry.interval} is "
                    f"{entry.status}; interval {interval} is not committed ahead of it"
                )
            cursor = entry.interval.end
        if cursor < interval.start:
            raise OrderingGapError(
                f"ordered pipeline {self.settings.pipeline!r}: [{cursor.isoformat()}, {interval.start.isoformat()}) "
                f"has not been processed; interval {interval} is not committed ahead of the gap"
            )

    # -- failure and reporting ------------------------------------------------------------------

    def _on_failure(self, claim: IntervalClaim, interval: Interval, ctx: RunContext, error: BaseException) -> None:
        try:
            self.ledger.fail(claim, error=f"{type(error).__name__}: {error}")
        except Exception:
            log.warning("Could not mark interval %s failed in the ledger", interval, exc_info=True)
        kind = "ceiling_exceeded" if isinstance(error, DeadLetterCeilingExceeded) else "interval_failed"
        metrics.incr(kind, tags={"pipeline": self.settings.pipeline})
        self._event(kind, interval, ctx, {"error_class": type(error).__name__, "error": str(error)[:2000]})

    def _event(self, kind: str, interval: Interval, ctx: RunContext, detail: dict[str, Any]) -> None:
        self.events.record(
            kind,
            pipeline=self.settings.pipeline,
            interval=interval,
            dag_id=ctx.dag_id,
            task_id=ctx.task_id,
            run_id=ctx.run_id,
            detail=detail,
        )

    # -- rollback -------------------------------------------------------------------------------

    def rollback(self, interval: Interval, *, to_version: int, context: RunContext | None = None) -> int:
        """
        Restore the destination rows ``to_version`` wrote; returns the new version (reason ``rollback``).

        Needs ``keep_versions`` to have archived that version and a sink with an interval or timestamp column.
        """
        ctx = context or RunContext(reason="rollback")
        ctx.reason = "rollback"
        rows = self.ledger.archived_rows(self.settings.pipeline, interval, to_version)
        if rows is None:
            raise SelfHealError(
                f"version {to_version} of {interval} is not in the archive "
                f"(keep_versions={self.settings.keep_versions})"
            )
        target = next(v for v in self.ledger.versions(self.settings.pipeline, interval) if v.version == to_version)
        current = self.ledger.get(self.settings.pipeline, interval)
        claim = self.ledger.try_claim(self.settings.pipeline, interval, reprocess=True, run_id=ctx.run_id)
        if claim is None:
            raise IntervalBusyError(f"interval {interval} is being processed; roll back later")
        with self.destination_engine.begin() as conn:
            store_conn = conn if self.same_database else None
            if current is not None and current.version > 0:
                self.ledger.archive_rows(
                    self.settings.pipeline,
                    interval,
                    version=current.version,
                    rows=self.sink.current_rows(conn, interval),
                    keep_versions=max(self.settings.keep_versions, 1),
                    connection=store_conn,
                )
            table = self.sink.table(conn)
            self.sink.delete_scope(conn, interval)
            self.sink.write(conn, [Pending(self.sink.to_row(r, interval, table), r) for r in rows])
            if store_conn is not None:
                version = self.ledger.commit(
                    claim, reason="rollback", rows_written=len(rows), checksum=target.checksum, connection=store_conn
                )
        if store_conn is None:
            version = self.ledger.commit(claim, reason="rollback", rows_written=len(rows), checksum=target.checksum)
        self._event("rollback", interval, ctx, {"to_version": to_version, "new_version": version})
        return version
