"""The pure breaker state machine against a naive model (Hypothesis stateful), plus the policy's rules."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from airflow_selfheal.healing import breaker_state as machine
from airflow_selfheal.healing.breaker_state import BreakerPolicy, BreakerState, Outcome
from tests.healing.breaker_model import T0, BreakerMachineBase, Observed, transition_name


class PureBreaker(BreakerMachineBase):
    """The functions of breaker_state applied to an in-memory BreakerState."""

    def setup(self, policy: BreakerPolicy) -> None:
        self.state = BreakerState()

    def do_admit(self, caller: tuple[str, ...]) -> tuple[bool, bool, dt.datetime | None, str | None]:
        self.state, admission, transition = machine.admit(self.policy, self.state, self.now, caller)
        assert admission.state == self.state.state
        return admission.allowed, admission.probe, admission.retry_at, transition_name(transition)

    def do_record(self, caller: tuple[str, ...], outcome: Outcome) -> str | None:
        self.state, transition = machine.record(self.policy, self.state, self.now, outcome, caller, "boom")
        return transition_name(transition)

    def do_force_open(self, open_for: dt.timedelta | None) -> str | None:
        self.state, transition = machine.force_open(self.policy, self.state, self.now, open_for, "by hand")
        return transition_name(transition)

    def do_reset(self) -> str | None:
        self.state, transition = machine.reset(self.state)
        return transition_name(transition)

    def observe(self) -> Observed:
        live = {p.owner for p in self.state.probes if p.acquired_at + self.policy.probe_timeout > self.now}
        return Observed(
            self.state.state,
            self.state.consecutive_failures,
            self.state.window_totals(self.policy, self.now),
            self.state.next_probe_at,
            self.state.open_count,
            frozenset(live),
        )


def test_state_machine_matches_the_model() -> None:
    run_state_machine_as_test(
        PureBreaker,
        settings=settings(
            max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )


def test_cooldown_doubles_per_failed_probe_and_is_capped() -> None:
    policy = BreakerPolicy(
        failure_threshold=1, open_for=dt.timedelta(seconds=10), max_open_for=dt.timedelta(seconds=35)
    )
    state, now, cooldowns = BreakerState(), T0, []
    state, transition = machine.record(policy, state, now, Outcome.FAILURE, ["t"], "503")
    assert transition == machine.Transition.OPENED
    for _ in range(4):
        assert state.next_probe_at is not None and state.opened_at is not None
        cooldowns.append((state.next_probe_at - state.opened_at).total_seconds())
        now = state.next_probe_at
        state, admission, _ = machine.admit(policy, state, now, ["probe"])
        assert admission.probe
        state, transition = machine.record(policy, state, now, Outcome.FAILURE, ["probe"], "still 503")
        assert transition == machine.Transition.PROBE_FAILED
    assert cooldowns == [10, 20, 35, 35]
    now = state.next_probe_at
    assert now is not None
    state, _, _ = machine.admit(policy, state, now, ["probe"])
    state, transition = machine.record(policy, state, now, Outcome.SUCCESS, ["probe"])
    assert (transition, state.state, state.open_count) == (machine.Transition.CLOSED, "closed", 0)
    assert state.last_error == "still 503", "the last error stays visible after closing"


def test_only_the_permitted_number_of_probes_and_expired_slots_free_up() -> None:
    policy = BreakerPolicy(failure_threshold=1, half_open_max_probes=2, probe_timeout=dt.timedelta(minutes=1))
    state, _ = machine.force_open(policy, BreakerState(), T0, dt.timedelta(seconds=1), "maintenance")
    now = T0 + dt.timedelta(seconds=1)
    admitted = []
    for owner in ("a", "b", "c", "d"):
        state, admission, _ = machine.admit(policy, state, now, [owner])
        admitted.append(admission.allowed)
    assert admitted == [True, True, False, False]
    state, again, _ = machine.admit(policy, state, now, ["a"])
    assert again.allowed and again.probe, "a probe holder asking again is still the probe"
    later = now + dt.timedelta(minutes=1)
    state, admission, _ = machine.admit(policy, state, later, ["c"])
    assert admission.allowed, "slots of probes that never reported expire"
    state, transition = machine.record(policy, state, later, Outcome.SUCCESS, ["a"])
    assert transition is None, "an expired probe's late report decides nothing"


def test_forced_open_without_duration_waits_for_reset() -> None:
    policy = BreakerPolicy()
    state, _ = machine.force_open(policy, BreakerState(), T0, None, "vendor outage")
    far = T0 + dt.timedelta(days=365)
    assert not machine.may_proceed(state, far, half_open_max_probes=1, probe_timeout=policy.probe_timeout)
    state, admission, _ = machine.admit(policy, state, far, ["x"])
    assert not admission.allowed and admission.retry_at is None
    state, transition = machine.reset(state)
    assert state.state == "closed" and transition == machine.Transition.RESET


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"failure_threshold": None}, "failure_threshold or failure_rate_threshold"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_rate_threshold": 1.5, "window": 10}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 0.5}, "window="),
        ({"window": 0}, "window"),
        ({"window": dt.timedelta(0)}, "window"),
        ({"window": 5, "minimum_calls": 6}, "minimum_calls"),
        ({"open_for": dt.timedelta(0)}, "open_for"),
        ({"open_for": dt.timedelta(minutes=5), "max_open_for": dt.timedelta(minutes=1)}, "max_open_for"),
        ({"half_open_max_probes": 0}, "half_open_max_probes"),
        ({"probe_timeout": dt.timedelta(0)}, "probe_timeout"),
    ],
)
def test_bad_policies_name_the_argument(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


def test_callbacks_alone_heal_the_breaker_after_the_cooldown() -> None:
    """No sensor or guard asks to probe: after the cooldown the next reported outcome decides."""
    policy = BreakerPolicy(failure_threshold=1, open_for=dt.timedelta(minutes=1))
    state, _ = machine.record(policy, BreakerState(), T0, Outcome.FAILURE, ["task:1"], "503")
    during = T0 + dt.timedelta(seconds=59)
    assert machine.record(policy, state, during, Outcome.SUCCESS, ["task:2"])[1] is None, "the cooldown holds"
    after = T0 + dt.timedelta(minutes=1)
    reopened, transition = machine.record(policy, state, after, Outcome.FAILURE, ["task:3"], "503 again")
    assert transition == machine.Transition.PROBE_FAILED and reopened.next_probe_at == after + dt.timedelta(minutes=2)
    closed, transition = machine.record(policy, state, after, Outcome.SUCCESS, ["task:3"])
    assert (closed.state, transition) == ("closed", machine.Transition.CLOSED)
