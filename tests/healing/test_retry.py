"""In-task retries: full-jitter bounds, attempt counts, the time budget, permanent errors and callbacks."""

from __future__ import annotations

import logging
import random
import socket
import statistics
import time
from collections.abc import Callable

import pytest
import tenacity

from airflow_selfheal.healing.classify import ErrorClassifier
from airflow_selfheal.healing.retry import RetryAttempt, RetrySettings, full_jitter_wait, retrying


class FakeTime:
    """A clock that only moves when the code under test sleeps (or a test says work took time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Raises the given errors in turn, then returns ``"done"``; counts calls."""

    def __init__(self, *errors: BaseException, work: float = 0.0, fake: FakeTime | None = None) -> None:
        self.errors = list(errors)
        self.raised: list[BaseException] = []
        self.calls = 0
        self.work = work
        self.fake = fake

    def __call__(self) -> str:
        self.calls += 1
        if self.fake is not None:
            self.fake.now += self.work
        if self.errors:
            error = self.errors.pop(0)
            self.raised.append(error)
            raise error
        return "done"


def transient(n: int) -> list[BaseException]:
    return [ConnectionResetError(f"reset {i}") for i in range(n)]


# --- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"initial_delay": float("nan")}, "initial_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"max_delay": -0.1}, "max_delay"),
        ({"budget": 0}, "budget"),
        ({"budget": float("inf")}, "budget"),
        ({"budget": "300"}, "budget"),
    ],
)
def test_settings_reject_bad_values_by_name(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must be"):
        RetrySettings(**kwargs)


def test_delay_ceiling_grows_then_caps() -> None:
    settings = RetrySettings(initial_delay=1.5, multiplier=3, max_delay=20)
    assert [settings.delay_ceiling(n) for n in (1, 2, 3, 4)] == [1.5, 4.5, 13.5, 20]
    assert settings.delay_ceiling(10**9) == 20  # no OverflowError (nor a huge integer) for absurd attempts
    assert RetrySettings(initial_delay=0).delay_ceiling(10**9) == 0
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        settings.delay_ceiling(0)


# --- full jitter ----------------------------------------------------------------------------------------------------


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


def test_full_jitter_is_uniform_over_the_whole_window() -> None:
    settings = RetrySettings(initial_delay=0.5, multiplier=2, max_delay=10)
    wait = full_jitter_wait(settings, rng=random.Random(20240611))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (9, 10.0)]:
        samples = [wait(_state(attempt)) for _ in range(4000)]
        assert min(samples) >= 0.0 and max(samples) <= ceiling
        # Uniform(0, c): mean c/2, standard deviation c/sqrt(12); the spread reaches both ends of the window.
        assert statistics.fmean(samples) == pytest.approx(ceiling / 2, rel=0.04)
        assert statistics.pstdev(samples) == pytest.approx(ceiling / 12**0.5, rel=0.05)
        assert min(samples) < 0.01 * ceiling and max(samples) > 0.99 * ceiling


def test_seeded_jitter_is_reproducible() -> None:
    settings = RetrySettings()
    first = full_jitter_wait(settings, rng=random.Random(7))
    second = full_jitter_wait(settings, rng=random.Random(7))
    assert [first(_state(n)) for n in range(1, 6)] == [second(_state(n)) for n in range(1, 6)]


# --- attempts, permanent errors, the original exception -----------------------------------------------------------


def test_transient_errors_are_retried_until_success() -> None:
    fake = FakeTime()
    attempts: list[RetryAttempt] = []
    action = Flaky(*transient(2))
    result = retrying(RetrySettings(max_attempts=5), on_retry=attempts.append, sleep=fake.sleep, clock=fake.clock)(
        action
    )
    assert result == "done"
    assert action.calls == 3
    assert [a.attempt for a in attempts] == [1, 2]
    assert [a.error for a in attempts] == action.raised
    assert [a.delay for a in attempts] == fake.sleeps
    assert attempts[1].elapsed == pytest.approx(fake.sleeps[0])


def test_gives_up_after_max_attempts_with_the_original_exception(closed_port: int) -> None:
    fake = FakeTime()
    calls: list[int] = []

    def connect() -> None:
        calls.append(1)
        socket.create_connection(("127.0.0.1", closed_port), timeout=2).close()

    with pytest.raises(ConnectionRefusedError) as raised:
        retrying(RetrySettings(max_attempts=4), sleep=fake.sleep, clock=fake.clock)(connect)
    assert len(calls) == 4
    assert len(fake.sleeps) == 3
    assert not isinstance(raised.value, tenacity.RetryError)
    assert "connect" in [frame.name for frame in raised.traceback]  # the traceback still points into our code


def test_permanent_errors_are_raised_at_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    attempts: list[RetryAttempt] = []
    bug = KeyError("customer_id")
    action = Flaky(bug)
    with caplog.at_level(logging.INFO), pytest.raises(KeyError) as raised:
        retrying(RetrySettings(), on_retry=attempts.append, sleep=fake.sleep, clock=fake.clock)(action)
    assert raised.value is bug
    assert (action.calls, fake.sleeps, attempts) == (1, [], [])
    assert "Not retrying: KeyError is permanent" in caplog.text


def test_a_permanent_error_after_transient_ones_stops_retrying() -> None:
    fake = FakeTime()
    action = Flaky(ConnectionResetError("reset"), ValueError("bad row"), ConnectionResetError("reset"))
    with pytest.raises(ValueError, match="bad row"):
        retrying(RetrySettings(max_attempts=10), sleep=fake.sleep, clock=fake.clock)(action)
    assert action.calls == 2


def test_custom_classifier_decides_what_is_retried() -> None:
    fake = FakeTime()
    action = Flaky(KeyError("eventually consistent"))
    classifier = ErrorClassifier(transient=[KeyError])
    assert retrying(RetrySettings(), classifier, sleep=fake.sleep, clock=fake.clock)(action) == "done"
    assert action.calls == 2


def test_works_as_an_iterator_of_attempts() -> None:
    fake = FakeTime()
    action = Flaky(*transient(1))
    for attempt in retrying(RetrySettings(), sleep=fake.sleep, clock=fake.clock):
        with attempt:
            result = action()
    assert (result, action.calls) == ("done", 2)


# --- the budget ---------------------------------------------------------------------------------------------------


def test_stops_when_the_next_sleep_would_overrun_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    settings = RetrySettings(max_attempts=100, initial_delay=10, multiplier=2, max_delay=40, budget=60)
    action = Flaky(*transient(100), work=1.0, fake=fake)
    with pytest.raises(ConnectionResetError), caplog.at_level(logging.ERROR):
        retrying(settings, sleep=fake.sleep, clock=fake.clock, rng=random.Random(3))(action)
    # Replay the same draws: every sleep taken fitted the budget, and the first one that did not was refused.
    replay = random.Random(3)
    draws = [replay.uniform(0, settings.delay_ceiling(n)) for n in range(1, action.calls + 1)]
    assert fake.sleeps == draws[:-1]
    elapsed = fake.now - 1000.0
    assert elapsed <= settings.budget
    assert draws[-1] > settings.budget - elapsed
    assert action.calls < settings.max_attempts
    assert "of the 60s budget" in caplog.text


def test_budget_holds_in_real_time() -> None:
    settings = RetrySettings(max_attempts=1000, initial_delay=0.02, multiplier=1.5, max_delay=0.05, budget=0.3)
    action = Flaky(*transient(1000))
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        retrying(settings)(action)
    assert time.monotonic() - started < settings.budget + 0.15
    assert 2 < action.calls < 1000


def test_each_call_gets_its_own_budget() -> None:
    fake = FakeTime()
    settings = RetrySettings(max_attempts=3, initial_delay=10, multiplier=1, max_delay=10, budget=25)
    retry = retrying(settings, sleep=fake.sleep, clock=fake.clock, rng=random.Random(1))
    assert retry(Flaky(*transient(2))) == "done"
    assert retry(Flaky(*transient(2))) == "done"  # the time spent by the first call does not count
    assert len(fake.sleeps) == 4


# --- callbacks and logs ---------------------------------------------------------------------------------------------


def test_failing_on_retry_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()

    def broken_recorder(attempt: RetryAttempt) -> None:
        raise RuntimeError("heal event store is down")

    with caplog.at_level(logging.WARNING):
        result = retrying(RetrySettings(), on_retry=broken_recorder, sleep=fake.sleep, clock=fake.clock)(
            Flaky(*transient(2))
        )
    assert result == "done"
    failures = [r for r in caplog.records if "on_retry callback" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)


def test_every_retry_is_logged_lazily(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    with caplog.at_level(logging.WARNING, logger="airflow_selfheal.healing.retry"):
        retrying(RetrySettings(max_attempts=3), sleep=fake.sleep, clock=fake.clock)(Flaky(*transient(2)))
    retries = [r for r in caplog.records if r.getMessage().startswith("Attempt")]
    assert len(retries) == 2
    assert retries[0].args is not None and "%s" in str(retries[0].msg)  # formatted only when emitted
    message = retries[0].getMessage()
    assert message.startswith("Attempt 1 of 3 failed with transient ConnectionResetError: reset 0; retrying in ")


def test_rejects_wrong_argument_types() -> None:
    bad_classifier: Callable[..., object] = retrying
    with pytest.raises(TypeError, match="settings must be a RetrySettings"):
        bad_classifier({"max_attempts": 3})
    with pytest.raises(TypeError, match="classifier must be an ErrorClassifier"):
        bad_classifier(RetrySettings(), lambda e: True)
