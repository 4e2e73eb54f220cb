"""The persistent breaker: it agrees with the pure machine, and stays atomic under 16 concurrent processes."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from airflow_selfheal.healing.breaker_state import BreakerPolicy, Outcome
from airflow_selfheal.hooks.circuit_breaker import CircuitBreakerHook, Origin
from airflow_selfheal.hooks.heal_events import HealEventHook
from tests.conftest import Database
from tests.healing.breaker_model import BreakerMachineBase, Observed, transition_name

EXAMPLES = {"sqlite": 20, "postgres": 8, "mysql": 8}


def store_machine(conn_id: str, prefix: str) -> type[BreakerMachineBase]:
    """A state machine whose breaker lives in the real store (one fresh breaker name per example)."""

    class StoreBreaker(BreakerMachineBase):
        def setup(self, policy: BreakerPolicy) -> None:
            self.name = f"b-{uuid.uuid4().hex[:12]}"
            self.hook = CircuitBreakerHook(conn_id, table_prefix=prefix, clock=self.clock)

        def do_admit(self, caller: tuple[str, ...]) -> tuple[bool, bool, dt.datetime | None, str | None]:
            change = self.hook.admit(self.name, self.policy, caller)
            assert change.admission is not None
            a = change.admission
            return a.allowed, a.probe, a.retry_at, transition_name(change.transition)

        def do_record(self, caller: tuple[str, ...], outcome: Outcome) -> str | None:
            change = self.hook.record(self.name, self.policy, outcome, caller, error="boom")
            return transition_name(change.transition)

        def do_force_open(self, open_for: dt.timedelta | None) -> str | None:
            return transition_name(self.hook.force_open(self.name, open_for, policy=self.policy).transition)

        def do_reset(self) -> str | None:
            return transition_name(self.hook.reset(self.name, policy=self.policy).transition)

        def observe(self) -> Observed:
            found = self.hook.get(self.name, self.policy)
            if found is None:
                return Observed("closed", 0, (0, 0), None, 0, frozenset())
            m = found.machine
            live = {p.owner for p in m.probes if p.acquired_at + self.policy.probe_timeout > self.now}
            assert found.probes_in_flight == len(m.probes)
            return Observed(
                m.state,
                m.consecutive_failures,
                m.window_totals(self.policy, self.now),
                m.next_probe_at,
                m.open_count,
                frozenset(live),
            )

        def teardown(self) -> None:
            if not hasattr(self, "hook"):
                return
            events = self.hook.events.list_events(pipeline=self.name)
            assert [e.kind for e in events] == [f"breaker_{t}" for t in self.transitions], (
                "exactly one heal event per transition, in order"
            )

    return StoreBreaker


def test_store_agrees_with_the_model(database: Database, table_prefix: str) -> None:
    run_state_machine_as_test(
        store_machine(database.conn_id, table_prefix),
        settings=settings(
            max_examples=EXAMPLES[database.name],
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_manual_control_and_listing(database: Database, table_prefix: str) -> None:
    hook = CircuitBreakerHook(database.conn_id, table_prefix=table_prefix)
    assert hook.get("vendor_feed") is None
    opened = hook.force_open("vendor_feed", reason="vendor maintenance until 14:00", origin=Origin(dag_id="ops"))
    assert (opened.snapshot.state, opened.snapshot.next_probe_at) == ("open", None)
    hook.force_open("orders_api", dt.timedelta(minutes=5))
    assert [b.name for b in hook.list_states()] == ["orders_api", "vendor_feed"]
    assert not hook.may_proceed("vendor_feed", half_open_max_probes=1, probe_timeout=dt.timedelta(minutes=1))
    assert hook.get("vendor_feed").last_error == "vendor maintenance until 14:00"  # type: ignore[union-attr]

    hook.reset("vendor_feed")
    assert hook.get("vendor_feed").state == "closed"  # type: ignore[union-attr]
    assert hook.may_proceed("vendor_feed", half_open_max_probes=1, probe_timeout=dt.timedelta(minutes=1))
    kinds = [
        (e.kind, e.dag_id)
        for e in HealEventHook(database.conn_id, table_prefix=table_prefix).list_events(pipeline="vendor_feed")
    ]
    assert kinds == [("breaker_forced_open", "ops"), ("breaker_reset", None)]
    with pytest.raises(ValueError, match="open_for"):
        hook.force_open("x", dt.timedelta(0))


def test_time_window_survives_the_round_trip(database: Database, table_prefix: str) -> None:
    """Half of the calls in the last minute failed: the rate opens the breaker, consecutive failures do not."""
    policy = BreakerPolicy(
        failure_threshold=None, failure_rate_threshold=0.5, window=dt.timedelta(minutes=1), minimum_calls=4
    )
    now = [dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)]
    hook = CircuitBreakerHook(database.conn_id, table_prefix=table_prefix, clock=lambda: now[0])
    for outcome in (Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE):
        assert hook.record("api", policy, outcome, ("t",)).transition is None
        now[0] += dt.timedelta(seconds=10)
    stored = hook.get("api")
    assert (stored.window_calls, stored.window_failures) == (3, 2)  # type: ignore[union-attr]
    now[0] += dt.timedelta(seconds=35)  # 65 s: the failure at 0 s has left the one-minute window
    assert hook.record("api", policy, Outcome.SUCCESS, ("t",)).transition is None
    stored = hook.get("api")
    assert (stored.window_calls, stored.window_failures) == (3, 1)  # type: ignore[union-attr]
    assert hook.record("api", policy, Outcome.FAILURE, ("t",)).transition.value == "opened"  # type: ignore[union-attr]


# -- concurrency --------------------------------------------------------------------------------------------

WORKERS = 16


def _worker(conn_id: str, prefix: str, name: str, index: int, barrier: Any, results: Any) -> None:
    """One of many processes: fail at the same moment, then race for the half-open probe slots."""
    policy = BreakerPolicy(failure_threshold=3, open_for=dt.timedelta(seconds=1), half_open_max_probes=2)
    hook = CircuitBreakerHook(conn_id, table_prefix=prefix)
    hook.tables  # noqa: B018 - connect and create outside the timed race
    me = (f"task:w{index}",)
    barrier.wait()
    for _ in range(3):
        hook.record(name, policy, Outcome.FAILURE, me, error=f"503 from worker {index}")
    barrier.wait()
    admitted = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        change = hook.admit(name, policy, me)
        assert change.admission is not None
        if change.admission.allowed:
            admitted += 1
            break
        if change.admission.state == "half_open":
            break  # the probe slots are taken: we stay out
        time.sleep(0.02)
    results.put((index, admitted))


@pytest.mark.timeout(120)
def test_sixteen_processes_open_once_and_probe_within_limits(
    server_database: Database, server_table_prefix: str
) -> None:
    conn_id, prefix, name = server_database.conn_id, server_table_prefix, f"shared-{uuid.uuid4().hex[:8]}"
    CircuitBreakerHook(conn_id, table_prefix=prefix).tables  # noqa: B018 - create the tables once, up front
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(conn_id, prefix, name, i, barrier, results)) for i in range(WORKERS)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0

    events = HealEventHook(conn_id, table_prefix=prefix).list_events(pipeline=name)
    kinds = [e.kind for e in events]
    assert kinds.count("breaker_opened") == 1, kinds
    assert kinds.count("breaker_half_open") == 1, kinds
    assert sum(admitted for _, admitted in outcomes) == 2, "exactly half_open_max_probes probes were admitted"
    stored = CircuitBreakerHook(conn_id, table_prefix=prefix).get(name)
    assert stored is not None and (stored.state, stored.probes_in_flight) == ("half_open", 2)
    assert stored.revision >= 2 + 1, "the row went through compare-and-set updates"
