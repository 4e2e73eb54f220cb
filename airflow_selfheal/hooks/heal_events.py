"""The append-only log of healing actions (retries, dead letters, breaker transitions, backfills)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.payload import to_jsonable
from airflow_selfheal.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealEvent:
    """One healing action."""

    id: int
    occurred_at: dt.datetime
    kind: str
    pipeline: str | None
    interval: Interval | None
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    detail: dict[str, Any]


class HealEventHook(SelfHealStoreHook):
    """Records and reads heal events. Recording never raises: reporting must not fail a data task."""

    hook_name = "Self-heal events"

    def record(
        self,
        kind: str,
        *,
        pipeline: str | None = None,
        interval: Interval | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
    ) -> bool:
        """Append one event; returns False (and logs) if the store could not take it."""
        row = {
            "occurred_at": utcnow(),
            "kind": kind,
            "pipeline": pipeline,
            "interval_start": interval.start if interval else None,
            "interval_end": interval.end if interval else None,
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": run_id,
            "detail": json.dumps(to_jsonable(dict(detail or {})), sort_keys=True),
        }
        try:
            with self.begin(connection) as conn:
                conn.execute(sa.insert(self.tables.heal_events).values(**row))
        except Exception:
            if connection is not None:
                raise  # inside the caller's transaction the caller decides
            log.warning("Could not record heal event %s for pipeline %s", kind, pipeline, exc_info=True)
            return False
        return True

    def list_events(
        self,
        *,
        pipeline: str | None = None,
        kind: str | None = None,
        since: dt.datetime | None = None,
        limit: int = 1000,
    ) -> list[HealEvent]:
        """Events matching every filter given, oldest first."""
        table = self.tables.heal_events
        query = sa.select(table)
        if pipeline is not None:
            query = query.where(table.c.pipeline == pipeline)
        if kind is not None:
            query = query.where(table.c.kind == kind)
        if since is not None:
            query = query.where(table.c.occurred_at >= since)
        query = query.order_by(table.c.id).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            HealEvent(
                id=r["id"],
                occurred_at=r["occurred_at"],
                kind=r["kind"],
                pipeline=r["pipeline"],
                interval=Interval(r["interval_start"], r["interval_end"]) if r["interval_start"] else None,
                dag_id=r["dag_id"],
                task_id=r["task_id"],
                run_id=r["run_id"],
                detail=json.loads(r["detail"]) if r["detail"] else {},
            )
            for r in rows
        ]
