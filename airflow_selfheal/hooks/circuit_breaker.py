"""Circuit breakers kept in the state store: one row per breaker name, changed only by compare-and-set."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import sqlalchemy as sa

from airflow_selfheal.exceptions import SelfHealError
from airflow_selfheal.healing import breaker_state as machine
from airflow_selfheal.healing.breaker_state import (
    Admission,
    BreakerPolicy,
    BreakerState,
    Outcome,
    Probe,
    Transition,
)
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.store.types import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], dt.datetime]
_MAX_ERROR_CHARS = 4000  # last_error and event details stay readable and within TEXT on every dialect
_POLICY_FOR_MANUAL_CONTROL = BreakerPolicy(failure_threshold=1)


@dataclass(frozen=True)
class Origin:
    """Where a breaker change came from, copied into its heal event."""

    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class BreakerSnapshot:
    """One breaker as stored: its machine state plus bookkeeping."""

    name: str
    machine: BreakerState
    revision: int
    updated_at: dt.datetime
    window_calls: int
    window_failures: int

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        return self.machine.state

    @property
    def probes_in_flight(self) -> int:
        return len(self.machine.probes)

    @property
    def next_probe_at(self) -> dt.datetime | None:
        return self.machine.next_probe_at

    @property
    def consecutive_failures(self) -> int:
        return self.machine.consecutive_failures

    @property
    def open_count(self) -> int:
        return self.machine.open_count

    @property
    def last_error(self) -> str | None:
        return self.machine.last_error


@dataclass(frozen=True)
class Change:
    """The result of one atomic update: the breaker afterwards and the transition it made, if any."""

    snapshot: BreakerSnapshot
    transition: Transition | None
    admission: Admission | None = None


def _encode_window(policy: BreakerPolicy, state: BreakerState) -> str | None:
    if state.outcomes:
        return json.dumps({"outcomes": state.outcomes})
    if state.buckets:
        return json.dumps({"bucket_us": policy.bucket_us, "buckets": [list(b) for b in state.buckets]})
    return None


def _decode_window(policy: BreakerPolicy, text: str | None) -> tuple[str, tuple[tuple[int, int, int], ...]]:
    """Read the stored window; a window of another kind or bucket size (the policy changed) starts afresh."""
    if not text:
        return "", ()
    data = json.loads(text)
    if isinstance(policy.window, int):
        return str(data.get("outcomes", ""))[-policy.window :], ()
    if isinstance(policy.window, dt.timedelta) and data.get("bucket_us") == policy.bucket_us:
        return "", tuple((int(i), int(c), int(f)) for i, c, f in data.get("buckets", ()))
    return "", ()


def _encode_probes(probes: tuple[Probe, ...]) -> str | None:
    return json.dumps([[p.owner, p.acquired_at.isoformat()] for p in probes]) if probes else None


def _decode_probes(text: str | None) -> tuple[Probe, ...]:
    if not text:
        return ()
    return tuple(Probe(str(owner), dt.datetime.fromisoformat(at)) for owner, at in json.loads(text))


class CircuitBreakerHook(SelfHealStoreHook):
    """
    Reads and changes circuit breakers atomically, so every DAG, task and worker shares one breaker per name.

    Each change reads the row, applies the pure state machine
    (:mod:`airflow_selfheal.healing.breaker_state`) and writes back with
    ``UPDATE ... WHERE name = :name AND revision = :seen``; a writer that lost the race retries on
    the fresh row. The heal event of a transition is written in the same transaction, so there is
    exactly one event per transition.

    :param clock: returns the current aware UTC time (tests inject a fake clock).
    :param max_attempts: compare-and-set attempts before giving up.
    """

    hook_name = "Self-heal circuit breakers"

    def __init__(
        self,
        selfheal_conn_id: str | None = None,
        *,
        table_prefix: str | None = None,
        schema: str | None = None,
        clock: Clock | None = None,
        max_attempts: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(selfheal_conn_id, table_prefix=table_prefix, schema=schema, **kwargs)
        self.clock: Clock = clock or utcnow
        self.max_attempts = max_attempts

    @cached_property
    def events(self) -> HealEventHook:
        """Heal events of the same store."""
        return HealEventHook(self.selfheal_conn_id, table_prefix=self.table_prefix, schema=self.schema or "")

    # -- reading ------------------------------------------------------------------------------

    def get(self, name: str, policy: BreakerPolicy | None = None) -> BreakerSnapshot | None:
        """The breaker called ``name``, or ``None`` if it was never used."""
        table = self.tables.circuit_breakers
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.name == name)).mappings().first()
        return None if row is None else self._snapshot(row, policy)

    def list_states(self) -> list[BreakerSnapshot]:
        """Every breaker, by name."""
        table = self.tables.circuit_breakers
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(table).order_by(table.c.name)).mappings().all()
        return [self._snapshot(row, None) for row in rows]

    def may_proceed(self, name: str, *, half_open_max_probes: int, probe_timeout: dt.timedelta) -> bool:
        """Whether a new caller could be admitted now (closed, probe due, or a free probe slot); read-only."""
        found = self.get(name)
        if found is None:
            return True
        return machine.may_proceed(
            found.machine, self.clock(), half_open_max_probes=half_open_max_probes, probe_timeout=probe_timeout
        )

    # -- changing -----------------------------------------------------------------------------

    def admit(
        self, name: str, policy: BreakerPolicy, identities: tuple[str, ...], *, origin: Origin | None = None
    ) -> Change:
        """Ask to call the dependency now (see :func:`~airflow_selfheal.healing.breaker_state.admit`)."""

        def step(state: BreakerState, now: dt.datetime) -> tuple[BreakerState, Transition | None, Admission]:
            new, admission, transition = machine.admit(policy, state, now, identities)
            return new, transition, admission

        snapshot, transition, admission = self._change(name, policy, step, origin=origin, error=None)
        return Change(snapshot, transition, admission)

    def record(
        self,
        name: str,
        policy: BreakerPolicy,
        outcome: Outcome,
        identities: tuple[str, ...],
        *,
        error: str | None = None,
        origin: Origin | None = None,
    ) -> Change:
        """Report the outcome of a call (see :func:`~airflow_selfheal.healing.breaker_state.record`)."""
        error = None if error is None else error[:_MAX_ERROR_CHARS]

        def step(state: BreakerState, now: dt.datetime) -> tuple[BreakerState, Transition | None, None]:
            new, transition = machine.record(policy, state, now, outcome, identities, error)
            return new, transition, None

        snapshot, transition, _ = self._change(name, policy, step, origin=origin, error=error)
        return Change(snapshot, transition)

    def force_open(
        self,
        name: str,
        open_for: dt.timedelta | None = None,
        *,
        reason: str | None = None,
        origin: Origin | None = None,
        policy: BreakerPolicy | None = None,
    ) -> Change:
        """
        Open the breaker by hand (manual control, e.g. during a vendor's maintenance).

        :param open_for: how long until a probe may go through; ``None`` keeps it open until :meth:`reset`.
        :param reason: why, stored as the breaker's last error and in the heal event.
        """
        if open_for is not None and open_for <= dt.timedelta(0):
            raise ValueError(f"open_for must be a positive timedelta or None, got {open_for!r}")
        reason = reason or "forced open by hand"
        effective = policy or _POLICY_FOR_MANUAL_CONTROL

        def step(state: BreakerState, now: dt.datetime) -> tuple[BreakerState, Transition | None, None]:
            new, transition = machine.force_open(effective, state, now, open_for, reason)
            return new, transition, None

        snapshot, transition, _ = self._change(name, effective, step, origin=origin, error=reason)
        return Change(snapshot, transition)

    def reset(self, name: str, *, origin: Origin | None = None, policy: BreakerPolicy | None = None) -> Change:
        """Close the breaker by hand and forget its counters (manual control)."""

        def step(state: BreakerState, now: dt.datetime) -> tuple[BreakerState, Transition | None, None]:
            new, transition = machine.reset(state)
            return new, transition, None

        effective = policy or _POLICY_FOR_MANUAL_CONTROL
        snapshot, transition, _ = self._change(name, effective, step, origin=origin, error=None)
        return Change(snapshot, transition)

    # -- the compare-and-set loop ---------------------------------------------------------------

    def _change(
        self,
        name: str,
        policy: BreakerPolicy,
        step: Callable[[BreakerState, dt.datetime], tuple[BreakerState, Transition | None, T]],
        *,
        origin: Origin | None,
        error: str | None,
    ) -> tuple[BreakerSnapshot, Transition | None, T]:
        if not name or len(name) > 200:
            raise ValueError(f"name={name!r} must be 1 to 200 characters")
        table = self.tables.circuit_breakers
        for attempt in range(1, self.max_attempts + 1):
            now = self.clock()
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(sa.select(table).where(table.c.name == name)).mappings().first()
                    current = BreakerState() if row is None else self._state(row, policy)
                    new, transition, result = step(current, now)
                    if row is not None and new == current and transition is None:
                        return self._snapshot(row, policy), None, result
                    values = self._values(policy, new, now)
                    if row is None:
                        conn.execute(sa.insert(table).values(name=name, revision=1, **values))
                        revision = 1
                    else:
                        revision = int(row["revision"]) + 1
                        updated = conn.execute(
                            sa.update(table)
                            .where(table.c.name == name, table.c.revision == row["revision"])
                            .values(revision=revision, **values)
                        )
                        if updated.rowcount != 1:
                            raise _Conflict
                    if transition is not None:
                        self._record_event(conn, name, current, new, transition, origin, error, now, policy)
                snapshot = BreakerSnapshot(name, new, revision, now, values["window_calls"], values["window_failures"])
                return snapshot, transition, result
            except (_Conflict, sa.exc.IntegrityError):
                pass  # someone else changed (or created) the row first: decide again on the fresh row
            except sa.exc.OperationalError as exc:
                # Deadlock or serialization failure reported by the server: the same remedy.
                if attempt == self.max_attempts or not _is_retryable(exc):
                    raise
            time.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))
        raise SelfHealError(f"breaker {name!r}: gave up after {self.max_attempts} concurrent updates")

    def _record_event(
        self,
        conn: sa.Connection,
        name: str,
        before: BreakerState,
        after: BreakerState,
        transition: Transition,
        origin: Origin | None,
        error: str | None,
        now: dt.datetime,
        policy: BreakerPolicy,
    ) -> None:
        calls, failures = before.window_totals(policy, now)
        detail: dict[str, Any] = {
            "breaker": name,
            "from": before.state,
            "to": after.state,
            "error": error,
            "consecutive_failures": before.consecutive_failures,
            "window_calls": calls,
            "window_failures": failures,
            "open_count": after.open_count,
            "next_probe_at": after.next_probe_at,
        }
        if after.opened_at is not None and after.next_probe_at is not None:
            detail["cooldown_seconds"] = (after.next_probe_at - after.opened_at).total_seconds()
        origin = origin or Origin()
        self.events.record(
            f"breaker_{transition.value}",
            pipeline=name,
            dag_id=origin.dag_id,
            task_id=origin.task_id,
            run_id=origin.run_id,
            detail=detail,
            connection=conn,
        )

    def record_ignored_error(self, name: str, error: str, *, origin: Origin | None = None) -> bool:
        """Report an error that does not count against the breaker (e.g. a bug); never raises."""
        origin = origin or Origin()
        return self.events.record(
            "breaker_error_ignored",
            pipeline=name,
            dag_id=origin.dag_id,
            task_id=origin.task_id,
            run_id=origin.run_id,
            detail={"breaker": name, "error": error[:_MAX_ERROR_CHARS]},
        )

    # -- row mapping --------------------------------------------------------------------------

    @staticmethod
    def _values(policy: BreakerPolicy, state: BreakerState, now: dt.datetime) -> dict[str, Any]:
        calls, failures = state.window_totals(policy, now)
        started = None
        if state.buckets and policy.bucket_us:
            started = policy.bucket_start(state.buckets[0][0])
        return {
            "state": state.state,
            "consecutive_failures": state.consecutive_failures,
            "window_calls": calls,
            "window_failures": failures,
            "window_started_at": started,
            "window_data": _encode_window(policy, state),
            "opened_at": state.opened_at,
            "next_probe_at": state.next_probe_at,
            "open_count": state.open_count,
            "probes_in_flight": len(state.probes),
            "probe_leases": _encode_probes(state.probes),
            "last_error": state.last_error,
            "updated_at": now,
        }

    @staticmethod
    def _state(row: sa.RowMapping, policy: BreakerPolicy | None) -> BreakerState:
        outcomes, buckets = _decode_window(policy, row["window_data"]) if policy else ("", ())
        return BreakerState(
            state=row["state"],
            consecutive_failures=row["consecutive_failures"],
            outcomes=outcomes,
            buckets=buckets,
            opened_at=row["opened_at"],
            next_probe_at=row["next_probe_at"],
            open_count=row["open_count"],
            probes=_decode_probes(row["probe_leases"]),
            last_error=row["last_error"],
        )

    def _snapshot(self, row: sa.RowMapping, policy: BreakerPolicy | None) -> BreakerSnapshot:
        return BreakerSnapshot(
            name=row["name"],
            machine=self._state(row, policy),
            revision=row["revision"],
            updated_at=row["updated_at"],
            window_calls=row["window_calls"],
            window_failures=row["window_failures"],
        )


class _Conflict(Exception):
    """The row changed between our read and our write."""


def _is_retryable(exc: sa.exc.OperationalError) -> bool:
    text = str(exc.orig).lower()
    return any(hint in text for hint in ("deadlock", "serializ", "lock wait timeout", "database is locked"))
