"""What a dead letter is: the failed record handed to the table, and a row read back from it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.payload import decode_payload
from airflow_selfheal.store.schema import DISCARDED, PARKED, PENDING, REDRIVING, RESOLVED

STAGES = ("read", "transform", "write")
STATUSES = (PENDING, REDRIVING, RESOLVED, PARKED, DISCARDED)


@dataclass(frozen=True)
class FailedRecord:
    """A record that failed, as handed to :meth:`~airflow_selfheal.hooks.dead_letter.DeadLetterHook.add`."""

    pipeline: str
    payload: Any
    error: BaseException
    stage: str
    record_key: Any = None
    interval: Interval | None = None
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    traceback: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} must be one of {', '.join(STAGES)}")


@dataclass(frozen=True)
class DeadLetter:
    """One row of the dead-letter table."""

    id: int
    pipeline: str
    record_identity: str
    status: str
    stage: str
    error_class: str
    error_message: str | None
    traceback: str | None
    attempts: int
    payload_text: str
    payload_bytes: int
    payload_sha256: str
    payload_truncated: bool
    record_key: Any
    interval: Interval | None
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None
    claim_token: str | None = None
    claimed_at: dt.datetime | None = None

    @property
    def payload(self) -> Any:
        """The record as Python values (tagged types restored); a truncated payload stays a dict."""
        return decode_payload(self.payload_text)


def error_class_name(error: BaseException) -> str:
    """``module.QualName`` of an exception, the way the table stores and filters it."""
    cls = type(error)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def letter_from_row(row: Any) -> DeadLetter:
    """A row of the dead-letter table (a mapping) as a :class:`DeadLetter`."""
    interval = None
    if row["interval_start"] is not None and row["interval_end"] is not None:
        interval = Interval(row["interval_start"], row["interval_end"])
    return DeadLetter(
        id=row["id"],
        pipeline=row["pipeline"],
        record_identity=row["record_identity"],
        status=row["status"],
        stage=row["stage"],
        error_class=row["error_class"],
        error_message=row["error_message"],
        traceback=row["traceback"],
        attempts=row["attempts"],
        payload_text=row["payload"],
        payload_bytes=row["payload_bytes"],
        payload_sha256=row["payload_sha256"],
        payload_truncated=bool(row["payload_truncated"]),
        record_key=None if row["record_key"] is None else decode_payload(row["record_key"]),
        interval=interval,
        dag_id=row["dag_id"],
        task_id=row["task_id"],
        run_id=row["run_id"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        resolved_at=row["resolved_at"],
        claim_token=row["claim_token"],
        claimed_at=row["claimed_at"],
    )
