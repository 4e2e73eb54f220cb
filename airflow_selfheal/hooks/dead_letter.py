"""The dead-letter table: records that failed, with everything needed to understand and redrive them."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import traceback as traceback_module
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store import dialects
from airflow_selfheal.store.letters import (
    STATUSES,
    DeadLetter,
    FailedRecord,
    error_class_name,
    letter_from_row,
)
from airflow_selfheal.store.payload import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    encode_payload,
    record_identity,
    to_jsonable,
)
from airflow_selfheal.store.schema import DISCARDED, PARKED, PENDING, REDRIVING, RESOLVED
from airflow_selfheal.store.types import utcnow

# A user's decision (park, discard) survives the record failing again; anything else reopens.
_STICKY = (PARKED, DISCARDED)
# A redrive that has not finished a claimed letter within this long is presumed dead.
DEFAULT_CLAIM_STALE_AFTER = dt.timedelta(minutes=30)
_CHUNK = 500  # ids per IN (...) list: well below every dialect's parameter limit


class DeadLetterHook(SelfHealStoreHook):
    """
    Writes, reads and changes the status of dead letters.

    Dead-letter state machine::

        (record fails) -> pending --claim_for_redrive--> redriving --redrive_succeeded--> resolved
                             ^                               |
                             +------ redrive_failed ---------+ (attempts + 1)
                                                             +--> parked once attempts >= max_attempts

    - A ``redriving`` claim older than ``stale_after`` is claimable again, so a killed redrive never
      leaves letters stuck; the dead redrive's token no longer matches and its late calls change nothing.
    - ``parked`` and ``discarded`` are never picked up automatically; people set them
      (:meth:`set_status`) and undo them (:meth:`requeue`). They also survive the record failing again.
    - ``resolved`` is final: the record has been written. The same record failing again later in a
      normal run reopens it as ``pending`` (see :meth:`add`).
    - ``attempts`` counts failures: 1 when first dead-lettered, + 1 per failed redrive.

    :param max_payload_bytes: payloads whose JSON is larger are cut to this size; the hash of the
        full payload is kept.
    """

    hook_name = "Self-heal dead letters"

    def __init__(self, *args: Any, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_payload_bytes < 1024:
            raise ValueError(f"max_payload_bytes={max_payload_bytes} must be at least 1024")
        self.max_payload_bytes = max_payload_bytes

    def add(self, records: Sequence[FailedRecord], *, connection: sa.Connection | None = None) -> None:
        """
        Store failed records; a record already in the table (same pipeline and key, or same content
        when it has no key) is updated in place: attempts + 1, newest error, ``last_seen`` now.
        """
        if not records:
            return
        table = self.tables.dead_letters
        now = utcnow()
        # One statement may not touch a row twice (PostgreSQL refuses), so fold repeats first.
        rows_by_identity: dict[tuple[str, str], dict[str, Any]] = {}
        for record in records:
            row = self._row(record, now)
            key = (row["pipeline"], row["record_identity"])
            if key in rows_by_identity:
                row["attempts"] = rows_by_identity[key]["attempts"] + 1
            rows_by_identity[key] = row
        with self.begin(connection) as conn:
            dialects.upsert(
                conn,
                table,
                list(rows_by_identity.values()),
                key_columns=["pipeline", "record_identity"],
                update=lambda new: {
                    "attempts": table.c.attempts + new.attempts,
                    "last_seen": new.last_seen,
                    "error_class": new.error_class,
                    "error_message": new.error_message,
                    "traceback": new.traceback,
                    "stage": new.stage,
                    "run_id": new.run_id,
                    "payload": new.payload,
                    "status": sa.case(
                        (sa.or_(*(table.c.status == _constant(s) for s in _STICKY)), table.c.status),
                        else_=_constant(PENDING),
                    ),
                    "claim_token": sa.null(),
                    "resolved_at": sa.null(),
                },
            )

    def _row(self, record: FailedRecord, now: dt.datetime) -> dict[str, Any]:
        encoded = encode_payload(record.payload, max_bytes=self.max_payload_bytes)
        error = record.error
        tb = record.traceback
        if tb is None and error.__traceback__ is not None:
            tb = "".join(traceback_module.format_exception(type(error), error, error.__traceback__))
        return {
            "pipeline": record.pipeline,
            "record_identity": record_identity(record.record_key, encoded.sha256),
            "dag_id": record.dag_id,
            "task_id": record.task_id,
            "run_id": record.run_id,
            "interval_start": record.interval.start if record.interval else None,
            "interval_end": record.interval.end if record.interval else None,
            "record_key": None if record.record_key is None else json.dumps(to_jsonable(record.record_key)),
            "payload": encoded.text,
            "payload_bytes": encoded.size_bytes,
            "payload_sha256": encoded.sha256,
            "payload_truncated": encoded.truncated,
            "stage": record.stage,
            "error_class": error_class_name(error),
            "error_message": str(error)[:10000],
            "traceback": (tb or "")[-50000:] or None,
            "attempts": 1,
            "first_seen": now,
            "last_seen": now,
            "status": PENDING,
        }

    def get(self, letter_id: int) -> DeadLetter | None:
        """One dead letter by id."""
        table = self.tables.dead_letters
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == letter_id)).mappings().first()
        return None if row is None else letter_from_row(row)

    def list_letters(
        self,
        *,
        pipeline: str | None = None,
        statuses: Sequence[str] | None = None,
        error_class: str | None = None,
        older_than: dt.timedelta | None = None,
        newer_than: dt.timedelta | None = None,
        interval_from: dt.datetime | None = None,
        interval_to: dt.datetime | None = None,
        after_id: int | None = None,
        limit: int | None = 100,
    ) -> list[DeadLetter]:
        """
        Dead letters matching every filter given, oldest id first.

        Page through a large table with ``after_id`` set to the last id of the previous page.

        :param error_class: exact class name as stored (``ValueError``, ``mymodule.BadRow``).
        :param older_than: only letters last seen longer ago than this.
        :param newer_than: only letters last seen within this.
        """
        table = self.tables.dead_letters
        query = sa.select(table).where(
            *self._filters(
                pipeline=pipeline,
                statuses=statuses,
                error_class=error_class,
                older_than=older_than,
                newer_than=newer_than,
                interval_from=interval_from,
                interval_to=interval_to,
            )
        )
        if after_id is not None:
            query = query.where(table.c.id > after_id)
        query = query.order_by(table.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [letter_from_row(row) for row in conn.execute(query).mappings()]

    def count(self, *, pipeline: str | None = None, statuses: Sequence[str] | None = None) -> int:
        """How many dead letters match."""
        table = self.tables.dead_letters
        query = (
            sa.select(sa.func.count()).select_from(table).where(*self._filters(pipeline=pipeline, statuses=statuses))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def _filters(
        self,
        *,
        pipeline: str | None = None,
        statuses: Sequence[str] | None = None,
        error_class: str | None = None,
        older_than: dt.timedelta | None = None,
        newer_than: dt.timedelta | None = None,
        interval_from: dt.datetime | None = None,
        interval_to: dt.datetime | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        table = self.tables.dead_letters
        now = utcnow()
        clauses: list[sa.ColumnElement[bool]] = []
        if pipeline is not None:
            clauses.append(table.c.pipeline == pipeline)
        if statuses:
            unknown = set(statuses) - set(STATUSES)
            if unknown:
                raise ValueError(f"status {sorted(unknown)} unknown; use {', '.join(STATUSES)}")
            clauses.append(table.c.status.in_(list(statuses)))
        if error_class is not None:
            clauses.append(table.c.error_class == error_class)
        if older_than is not None:
            clauses.append(table.c.last_seen < now - older_than)
        if newer_than is not None:
            clauses.append(table.c.last_seen >= now - newer_than)
        if interval_from is not None:
            clauses.append(table.c.interval_start >= Interval(interval_from, interval_from).start)
        if interval_to is not None:
            clauses.append(table.c.interval_end <= Interval(interval_to, interval_to).end)
        return clauses

    def pipelines(self) -> list[str]:
        """Every pipeline that has dead letters."""
        table = self.tables.dead_letters
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(table.c.pipeline).distinct().order_by(table.c.pipeline)).scalars())

    def status_counts(self, *, pipeline: str | None = None) -> dict[str, int]:
        """Number of letters per status (every status present, zero when none)."""
        table = self.tables.dead_letters
        query = sa.select(table.c.status, sa.func.count()).group_by(table.c.status)
        if pipeline is not None:
            query = query.where(table.c.pipeline == pipeline)
        counts = dict.fromkeys(STATUSES, 0)
        with self.engine.connect() as conn:
            counts.update({status: int(n) for status, n in conn.execute(query).all()})
        return counts

    def set_status(self, letter_ids: Sequence[int], status: str, *, connection: sa.Connection | None = None) -> int:
        """Set the status of the given letters (discard, park, re-queue as pending); returns rows changed."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} unknown; use {', '.join(STATUSES)}")
        if not letter_ids:
            return 0
        table = self.tables.dead_letters
        values: dict[str, Any] = {"status": status, "claim_token": None}
        values["resolved_at"] = utcnow() if status == RESOLVED else None
        with self.begin(connection) as conn:
            result = conn.execute(sa.update(table).where(table.c.id.in_(list(letter_ids))).values(**values))
        return int(result.rowcount)

    def resolve_records(
        self,
        pipeline: str,
        identities: Sequence[str],
        *,
        connection: sa.Connection | None = None,
    ) -> int:
        """Mark open letters of these record identities resolved: the records have now succeeded."""
        if not identities:
            return 0
        table = self.tables.dead_letters
        changed = 0
        with self.begin(connection) as conn:
            for start in range(0, len(identities), 500):
                result = conn.execute(
                    sa.update(table)
                    .where(
                        table.c.pipeline == pipeline,
                        table.c.record_identity.in_(list(identities[start : start + 500])),
                        table.c.status.in_([PENDING, REDRIVING]),
                    )
                    .values(status=RESOLVED, resolved_at=utcnow(), claim_token=None)
                )
                changed += int(result.rowcount)
        return changed

    # -- redrive ------------------------------------------------------------------------------

    def claim_for_redrive(
        self,
        pipeline: str,
        *,
        limit: int,
        error_class: str | None = None,
        interval_from: dt.datetime | None = None,
        interval_to: dt.datetime | None = None,
        older_than: dt.timedelta | None = None,
        stale_after: dt.timedelta = DEFAULT_CLAIM_STALE_AFTER,
    ) -> list[DeadLetter]:
        """
        Claim up to ``limit`` letters of ``pipeline`` for a redrive, oldest (lowest id) first.

        Claimable are ``pending`` letters and ``redriving`` ones whose claim is older than
        ``stale_after``. Each letter is taken by a conditional UPDATE that re-checks it is still
        claimable, so concurrent redrives never get the same letter; the letters come back carrying
        this claim's token, which :meth:`redrive_succeeded` and :meth:`redrive_failed` check.

        :param limit: most letters to claim (a batch); at least 1.
        :param older_than: only letters last seen longer ago than this (let a fresh failure settle). A
            failed redrive moves ``last_seen``, so this also spaces out the redrives of one letter.
        :param stale_after: age after which another redrive's claim is presumed dead.
        """
        if limit < 1:
            raise ValueError(f"limit={limit} must be at least 1")
        table = self.tables.dead_letters
        token = str(uuid.uuid4())
        filters = self._filters(
            pipeline=pipeline,
            error_class=error_class,
            older_than=older_than,
            interval_from=interval_from,
            interval_to=interval_to,
        )
        claimed = 0
        # Each round claims what it can; letters lost to a concurrent redrive are replaced by the
        # next-oldest ones. Bounded, because a busy table could otherwise keep us looping.
        for _ in range(10):
            now = utcnow()
            claimable = sa.or_(
                table.c.status == PENDING,
                sa.and_(
                    table.c.status == REDRIVING,
                    sa.or_(
                        table.c.claim_token.is_(None),
                        table.c.claimed_at.is_(None),
                        table.c.claimed_at < now - stale_after,
                    ),
                ),
            )
            # Pick candidates outside the claiming transaction: the UPDATE below re-checks them.
            with self.engine.connect() as conn:
                candidates = list(
                    conn.execute(
                        sa.select(table.c.id).where(*filters, claimable).order_by(table.c.id).limit(limit - claimed)
                    ).scalars()
                )
            if not candidates:
                break
            claimed += self._claim(candidates, claimable, token, now)
            if claimed >= limit:
                break
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table).where(table.c.claim_token == token, table.c.status == REDRIVING).order_by(table.c.id)
            ).mappings()
            return [letter_from_row(row) for row in rows]

    def _claim(self, ids: list[int], claimable: sa.ColumnElement[bool], token: str, now: dt.datetime) -> int:
        table = self.tables.dead_letters
        statement = (
            sa.update(table)
            .where(table.c.id.in_(ids), claimable)
            .values(status=REDRIVING, claim_token=token, claimed_at=now)
        )
        attempts = 5
        for attempt in range(1, attempts + 1):
            try:
                with self.begin() as conn:
                    return int(conn.execute(statement).rowcount)
            except sa.exc.OperationalError:
                # Two claimers locking overlapping rows can deadlock; the database aborts one of them.
                if attempt == attempts:
                    raise
                time.sleep(random.uniform(0.01, 0.1) * attempt)
        return 0  # pragma: no cover - the loop returns or raises

    def redrive_succeeded(self, letters: Sequence[DeadLetter], connection: sa.Connection | None = None) -> int:
        """
        Mark redriven letters ``resolved``; returns how many were.

        A letter whose claim was lost meanwhile (it went stale and another redrive took it, or a
        person re-queued, parked or discarded it) is left alone.

        :param connection: resolve inside the caller's transaction, e.g. the one that wrote the records.
        """
        by_token: dict[str, list[int]] = {}
        for letter in letters:
            if letter.claim_token is None:
                raise ValueError(f"letters: dead letter {letter.id} carries no claim token; claim it first")
            by_token.setdefault(letter.claim_token, []).append(letter.id)
        table = self.tables.dead_letters
        changed = 0
        now = utcnow()
        with self.begin(connection) as conn:
            for token, ids in by_token.items():
                for start in range(0, len(ids), _CHUNK):
                    result = conn.execute(
                        sa.update(table)
                        .where(
                            table.c.id.in_(ids[start : start + _CHUNK]),
                            table.c.claim_token == token,
                            table.c.status == REDRIVING,
                        )
                        .values(status=RESOLVED, resolved_at=now, claim_token=None)
                    )
                    changed += int(result.rowcount)
        return changed

    def redrive_failed(
        self,
        letter: DeadLetter,
        error: BaseException,
        *,
        max_attempts: int,
        traceback: str | None = None,
        connection: sa.Connection | None = None,
    ) -> str | None:
        """
        Record that a redriven letter failed again: attempts + 1 and the newest error.

        The letter goes back to ``pending``, or to ``parked`` once its attempts reach ``max_attempts``
        (then no redrive picks it up again until someone re-queues it).

        :param max_attempts: failures (the original one included) after which the letter is parked.
        :param traceback: formatted traceback; default: taken from ``error``.
        :return: the letter's new status, or ``None`` when its claim was lost (nothing changed).
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1")
        if letter.claim_token is None:
            raise ValueError(f"letter: dead letter {letter.id} carries no claim token; claim it first")
        if traceback is None and error.__traceback__ is not None:
            traceback = "".join(traceback_module.format_exception(type(error), error, error.__traceback__))
        # The token guard means nobody changed the row since our claim, so letter.attempts is current.
        attempts = letter.attempts + 1
        status = PARKED if attempts >= max_attempts else PENDING
        table = self.tables.dead_letters
        with self.begin(connection) as conn:
            result = conn.execute(
                sa.update(table)
                .where(table.c.id == letter.id, table.c.claim_token == letter.claim_token, table.c.status == REDRIVING)
                .values(
                    status=status,
                    attempts=attempts,
                    error_class=error_class_name(error),
                    error_message=str(error)[:10000],
                    traceback=(traceback or "")[-50000:] or None,
                    last_seen=utcnow(),
                    claim_token=None,
                    claimed_at=None,
                )
            )
        return status if result.rowcount == 1 else None

    def requeue(
        self,
        letter_ids: Sequence[int],
        *,
        reset_attempts: bool = True,
        connection: sa.Connection | None = None,
    ) -> int:
        """
        Put letters back to ``pending`` for the next redrive (a person's decision, e.g. after a fix).

        Works on ``parked``, ``discarded``, ``redriving`` (releases the claim: a still-running redrive
        can then no longer resolve or fail it) and ``pending`` letters; ``resolved`` ones are skipped.

        :param reset_attempts: start the letter's attempt budget afresh (attempts back to 1, the
            original failure), so a parked letter gets ``max_attempts`` - 1 more redrives.
        :return: number of letters re-queued.
        """
        if not letter_ids:
            return 0
        table = self.tables.dead_letters
        values: dict[str, Any] = {"status": PENDING, "claim_token": None, "claimed_at": None, "resolved_at": None}
        if reset_attempts:
            values["attempts"] = 1
        ids = list(letter_ids)
        changed = 0
        with self.begin(connection) as conn:
            for start in range(0, len(ids), _CHUNK):
                result = conn.execute(
                    sa.update(table)
                    .where(table.c.id.in_(ids[start : start + _CHUNK]), table.c.status != RESOLVED)
                    .values(**values)
                )
                changed += int(result.rowcount)
        return changed


def _constant(status: str) -> sa.ColumnElement[str]:
    """
    A status as an inline SQL literal, for the upsert's SET clause.

    Bound parameters there break executemany: SQLAlchemy refuses expanding IN lists, and mysqlclient
    repeats only the VALUES part of a multi-row INSERT. Statuses are our own fixed words, so inlining is safe.
    """
    if status not in STATUSES:
        raise ValueError(f"status={status!r} unknown")
    return sa.literal_column(f"'{status}'", sa.String)
