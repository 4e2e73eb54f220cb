"""
A deliberately naive model of the circuit breaker, and a Hypothesis state machine that checks a breaker against it.

The model keeps every outcome as a list of ``(time, failed)`` and recomputes counters from it; the cooldown
doubles step by step; probe slots are a dict. The implementation under test keeps compact aggregates (a
string of outcomes, time buckets, a doubling formula) and, in the store-backed variant, a database row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from airflow_selfheal.healing.breaker_state import BreakerPolicy, Outcome

T0 = dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Callers: tasks of two DAG runs and sensor-like gates that take the slot for their whole run.
CALLERS: list[tuple[str, ...]] = [
    ("task:a", "run:1"),
    ("task:b", "run:1"),
    ("task:c", "run:2"),
    ("run:1", "gate:1"),
    ("run:2", "gate:2"),
    ("call:x",),
]

# Time passes before most steps too, so runs where Hypothesis switches the advance rule off still move on.
WAITS = st.sampled_from([0, 0, 0, 1, 3, 10, 30])
OUTCOMES = st.sampled_from([Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.IGNORED])


@dataclass
class Model:
    """The breaker as a person would describe it."""

    policy: BreakerPolicy
    state: str = "closed"
    outcomes: list[tuple[dt.datetime, bool]] = field(default_factory=list)
    level: int = 0  # openings since the last close
    cooldown: dt.timedelta = dt.timedelta(0)
    next_probe_at: dt.datetime | None = None
    probes: dict[str, dt.datetime] = field(default_factory=dict)

    def consecutive(self) -> int:
        count = 0
        for _, failed in reversed(self.outcomes):
            if not failed:
                break
            count += 1
        return count

    def window(self, now: dt.datetime) -> tuple[int, int]:
        window = self.policy.window
        if isinstance(window, int):
            recent = [failed for _, failed in self.outcomes][-window:]
        elif isinstance(window, dt.timedelta):
            size = window // self.policy.window_buckets
            current = (now - EPOCH) // size
            recent = [
                failed for at, failed in self.outcomes if (at - EPOCH) // size > current - self.policy.window_buckets
            ]
        else:
            return 0, 0
        return len(recent), sum(recent)

    def live_probes(self, now: dt.datetime) -> dict[str, dt.datetime]:
        return {owner: at for owner, at in self.probes.items() if now - at < self.policy.probe_timeout}

    def _open(self, now: dt.datetime, duration: dt.timedelta | None) -> None:
        self.level += 1
        cap = self.policy.max_open_for
        assert cap is not None
        self.cooldown = self.policy.open_for if self.level == 1 else min(self.cooldown * 2, cap)
        self.state = "open"
        self.next_probe_at = now + (self.cooldown if duration is None else duration)
        self.outcomes = []
        self.probes = {}

    def _close(self) -> None:
        self.state, self.level, self.cooldown, self.next_probe_at = "closed", 0, dt.timedelta(0), None
        self.outcomes, self.probes = [], {}

    def admit(self, now: dt.datetime, caller: tuple[str, ...]) -> tuple[bool, bool, str | None]:
        """(allowed, probe, transition)"""
        if self.state == "closed":
            return True, False, None
        if self.state == "open":
            if self.next_probe_at is not None and now >= self.next_probe_at:
                self.state, self.probes = "half_open", {caller[0]: now}
                return True, True, "half_open"
            return False, False, None
        live = self.live_probes(now)
        if set(live) & set(caller):
            return True, True, None
        if len(live) < self.policy.half_open_max_probes:
            self.probes = {**live, caller[0]: now}
            return True, True, None
        return False, False, None

    def record(self, now: dt.datetime, caller: tuple[str, ...], outcome: Outcome) -> str | None:
        if self.state == "closed":
            if outcome is Outcome.IGNORED:
                return None
            self.outcomes.append((now, outcome is Outcome.FAILURE))
            if outcome is Outcome.SUCCESS:
                return None
            threshold, rate = self.policy.failure_threshold, self.policy.failure_rate_threshold
            calls, failures = self.window(now)
            by_count = threshold is not None and self.consecutive() >= threshold
            by_rate = rate is not None and calls >= (self.policy.minimum_calls or 0) and failures >= rate * calls
            if by_count or by_rate:
                self._open(now, None)
                return "opened"
            return None
        if self.state == "open":
            due = self.next_probe_at is not None and now >= self.next_probe_at
            if not due or outcome is Outcome.IGNORED:
                return None
            if outcome is Outcome.SUCCESS:
                self._close()
                return "closed"
            self._open(now, None)
            return "probe_failed"
        live = self.live_probes(now)
        holders = set(live) & set(caller)
        if not holders:
            return None
        if outcome is Outcome.SUCCESS:
            self._close()
            return "closed"
        if outcome is Outcome.FAILURE:
            self._open(now, None)
            return "probe_failed"
        self.probes = {o: at for o, at in live.items() if o not in holders}
        return None

    def force_open(self, now: dt.datetime, open_for: dt.timedelta | None) -> str:
        self._open(now, open_for or dt.timedelta(0))
        if open_for is None:
            self.next_probe_at = None
        return "forced_open"

    def reset(self) -> str:
        self._close()
        return "reset"


@st.composite
def policies(draw: st.DrawFn) -> BreakerPolicy:
    """Small numbers, so that every state is reached within a few steps."""
    rate = draw(st.none() | st.sampled_from([0.3, 0.5, 0.75, 1.0]))
    threshold = draw(st.integers(1, 4)) if rate is None else draw(st.none() | st.integers(1, 4))
    window: int | dt.timedelta | None = None
    minimum: int | None = None
    if rate is not None or draw(st.booleans()):
        if draw(st.booleans()):
            window = draw(st.integers(1, 8))
            minimum = draw(st.integers(1, window))
        else:
            window = dt.timedelta(seconds=draw(st.sampled_from([10, 30, 60, 90])))
            minimum = draw(st.integers(1, 5))
    open_for = dt.timedelta(seconds=draw(st.integers(1, 20)))
    return BreakerPolicy(
        failure_threshold=threshold,
        failure_rate_threshold=rate,
        window=window,
        minimum_calls=minimum,
        open_for=open_for,
        max_open_for=open_for * draw(st.sampled_from([1, 2, 3, 8])),
        half_open_max_probes=draw(st.integers(1, 3)),
        probe_timeout=dt.timedelta(seconds=draw(st.integers(5, 60))),
    )


@dataclass(frozen=True)
class Observed:
    """What the machine under test reports after a step (compared with the model)."""

    state: str
    consecutive_failures: int
    window: tuple[int, int]
    next_probe_at: dt.datetime | None
    open_count: int
    live_probe_owners: frozenset[str]


class BreakerMachineBase(RuleBasedStateMachine):
    """
    Drives a breaker implementation and the model with the same steps and compares them after each.

    Subclasses implement ``setup``, ``do_admit``, ``do_record``, ``do_force_open``, ``do_reset`` and
    ``observe``; ``self.now`` is the injected clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.transitions: list[str] = []
        self.manual_left = 2
        self.last_admitted: tuple[str, ...] | None = None

    def clock(self) -> dt.datetime:
        return self.now

    # -- to implement ------------------------------------------------------------------------------
    def setup(self, policy: BreakerPolicy) -> None:
        raise NotImplementedError

    def do_admit(self, caller: tuple[str, ...]) -> tuple[bool, bool, dt.datetime | None, str | None]:
        raise NotImplementedError

    def do_record(self, caller: tuple[str, ...], outcome: Outcome) -> str | None:
        raise NotImplementedError

    def do_force_open(self, open_for: dt.timedelta | None) -> str | None:
        raise NotImplementedError

    def do_reset(self) -> str | None:
        raise NotImplementedError

    def observe(self) -> Observed:
        raise NotImplementedError

    # -- rules ---------------------------------------------------------------------------------------
    @initialize(policy=policies())
    def start(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.model = Model(policy)
        self.setup(policy)

    @rule(seconds=st.integers(0, 45) | st.sampled_from([0, 1]), micros=st.sampled_from([0, 0, 1, 999_999]))
    def advance(self, seconds: int, micros: int) -> None:
        self.now += dt.timedelta(seconds=seconds, microseconds=micros)

    @rule(caller=st.sampled_from(CALLERS), wait=WAITS)
    def admit(self, caller: tuple[str, ...], wait: int) -> None:
        self.now += dt.timedelta(seconds=wait)
        expected = self.model.admit(self.now, caller)
        allowed, probe, retry_at, transition = self.do_admit(caller)
        assert (allowed, probe, transition) == expected
        if allowed:
            self.last_admitted = caller
        if not allowed and self.model.state == "open":
            assert retry_at == self.model.next_probe_at
        if not allowed and self.model.state == "half_open":
            assert retry_at is not None and retry_at > self.now, "a full half-open breaker says when a slot frees"
        self._note(transition)

    @rule(caller=st.sampled_from(CALLERS), outcome=OUTCOMES, wait=WAITS)
    def record(self, caller: tuple[str, ...], outcome: Outcome, wait: int) -> None:
        self.now += dt.timedelta(seconds=wait)
        self._record(caller, outcome)

    @precondition(lambda self: self.last_admitted is not None)
    @rule(outcome=OUTCOMES, wait=WAITS)
    def report_last_admitted(self, outcome: Outcome, wait: int) -> None:
        """The usual pattern: whoever was let through reports how the call went."""
        self.now += dt.timedelta(seconds=wait)
        assert self.last_admitted is not None
        self._record(self.last_admitted, outcome)

    def _record(self, caller: tuple[str, ...], outcome: Outcome) -> None:
        expected = self.model.record(self.now, caller, outcome)
        transition = self.do_record(caller, outcome)
        assert transition == expected
        self._note(transition)

    @precondition(lambda self: self.manual_left > 0)
    @rule(action=st.sampled_from(["force_open", "reset"]), seconds=st.none() | st.integers(1, 30))
    def manual(self, action: str, seconds: int | None) -> None:
        """Force open (for ``seconds``, or until reset) or reset: rare, or they would undo everything else."""
        self.manual_left -= 1
        if action == "reset":
            expected = self.model.reset()
            transition = self.do_reset()
        else:
            open_for = None if seconds is None else dt.timedelta(seconds=seconds)
            expected = self.model.force_open(self.now, open_for)
            transition = self.do_force_open(open_for)
        assert transition == expected
        self._note(transition)

    def _note(self, transition: str | None) -> None:
        if transition is not None:
            self.transitions.append(transition)

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def agrees_with_model(self) -> None:
        if not hasattr(self, "model"):
            return
        seen = self.observe()
        model = self.model
        assert seen.state == model.state
        assert seen.consecutive_failures == model.consecutive()
        assert seen.window == model.window(self.now)
        assert seen.next_probe_at == model.next_probe_at
        assert seen.open_count == model.level
        assert seen.live_probe_owners == frozenset(model.live_probes(self.now))
        assert len(seen.live_probe_owners) <= self.policy.half_open_max_probes
        if seen.state != "half_open":
            assert not seen.live_probe_owners


def transition_name(value: object) -> str | None:
    """A Transition enum (or None) as its plain string value."""
    return None if value is None else str(getattr(value, "value", value))


ClockFn = Callable[[], dt.datetime]
