"""
In-task retries of transient errors with tenacity: capped exponential backoff with full jitter, and a time budget.

The n-th sleep (after the n-th failed attempt, n >= 1) is drawn uniformly::

    ceiling_n = min(max_delay, initial_delay * multiplier ** (n - 1))
    sleep_n   = uniform(0, ceiling_n)

This is the "full jitter" of the AWS Architecture Blog ("Exponential Backoff And Jitter"): many workers that
failed together spread their retries over the whole window instead of hammering a recovering service in step.

Retrying stops at ``max_attempts`` or as soon as the next sleep would not fit into what is left of ``budget``
(seconds since the first attempt started), and then re-raises the ORIGINAL exception. Errors the classifier
calls permanent are raised at once.

Example::

    for attempt in retrying(RetrySettings(max_attempts=4), on_retry=record):
        with attempt:
            rows = fetch_page(cursor)

    # or: result = retrying(settings)(fetch_page, cursor)
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER, ErrorClassifier

log = logging.getLogger(__name__)

__all__ = ["RetryAttempt", "RetrySettings", "full_jitter_wait", "retrying"]

# Per-call bookkeeping stored on tenacity's RetryCallState (one per call, so retrying objects stay reusable).
_STARTED = "_selfheal_started"
_STOP_REASON = "_selfheal_stop_reason"


def _number(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RetrySettings:
    """
    How hard to retry.

    :param max_attempts: attempts in total, the first one included (1 means never retry).
    :param initial_delay: ceiling of the first sleep, in seconds.
    :param multiplier: growth of the ceiling per attempt (>= 1; 1 means a constant ceiling).
    :param max_delay: cap of the ceiling, in seconds.
    :param budget: total seconds the attempts and sleeps may take; no sleep starts that would overrun it.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0
    budget: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if _number(self.initial_delay, "initial_delay") < 0:
            raise ValueError(f"initial_delay must be >= 0 seconds, got {self.initial_delay!r}")
        if _number(self.multiplier, "multiplier") < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if _number(self.max_delay, "max_delay") < 0:
            raise ValueError(f"max_delay must be >= 0 seconds, got {self.max_delay!r}")
        if _number(self.budget, "budget") <= 0:
            raise ValueError(f"budget must be > 0 seconds, got {self.budget!r}")

    def delay_ceiling(self, attempt: int) -> float:
        """``min(max_delay, initial_delay * multiplier ** (attempt - 1))`` for the sleep after ``attempt``."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt!r}")
        if self.initial_delay == 0:
            return 0.0
        try:  # float power: an int multiplier would build a huge integer before failing
            grown = self.initial_delay * float(self.multiplier) ** (attempt - 1)
        except OverflowError:  # huge attempt numbers: the cap applies anyway
            grown = math.inf
        return float(min(self.max_delay, grown))


@dataclass(frozen=True)
class RetryAttempt:
    """
    One retry about to happen, as passed to ``on_retry``.

    :param attempt: number of the attempt that just failed (1-based).
    :param error: what it raised (classified transient).
    :param delay: seconds we sleep before the next attempt.
    :param elapsed: seconds since the first attempt started.
    """

    attempt: int
    error: BaseException
    delay: float
    elapsed: float


class _FullJitterWait(tenacity.wait.wait_base):
    """Tenacity wait strategy drawing ``uniform(0, settings.delay_ceiling(n))``."""

    def __init__(self, settings: RetrySettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.rng.uniform(0.0, self.settings.delay_ceiling(retry_state.attempt_number))


def full_jitter_wait(settings: RetrySettings, *, rng: random.Random | None = None) -> tenacity.wait.wait_base:
    """
    Tenacity wait strategy: ``sleep_n = uniform(0, min(max_delay, initial_delay * multiplier ** (n - 1)))``.

    :param settings: the backoff parameters.
    :param rng: random source (seed one for reproducible tests); a fresh ``random.Random`` by default.
    """
    return _FullJitterWait(settings, rng)


class _Hooks:
    """Tenacity callbacks sharing the settings, the classifier and the clock."""

    def __init__(
        self,
        settings: RetrySettings,
        classifier: ErrorClassifier,
        on_retry: Callable[[RetryAttempt], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.classifier = classifier
        self.on_retry = on_retry
        self.clock = clock

    def elapsed(self, state: tenacity.RetryCallState) -> float:
        return self.clock() - getattr(state, _STARTED, self.clock())

    def before(self, state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            setattr(state, _STARTED, self.clock())

    def should_retry(self, error: BaseException) -> bool:
        if self.classifier.is_transient(error):
            return True
        log.info("Not retrying: %s", self.classifier.explain(error))
        return False

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.settings.max_attempts:
            setattr(state, _STOP_REASON, f"all {self.settings.max_attempts} attempts failed")
            return True
        remaining = self.settings.budget - self.elapsed(state)
        if state.upcoming_sleep > remaining:
            setattr(
                state,
                _STOP_REASON,
                f"the next sleep ({state.upcoming_sleep:.2f}s) does not fit the remaining "
                f"{max(remaining, 0.0):.2f}s of the {self.settings.budget:g}s budget",
            )
            return True
        return False

    def before_sleep(self, state: tenacity.RetryCallState) -> None:
        error = _failure(state)
        attempt = RetryAttempt(state.attempt_number, error, state.upcoming_sleep, self.elapsed(state))
        log.warning(
            "Attempt %s of %s failed with transient %s: %s; retrying in %.2fs",
            attempt.attempt,
            self.settings.max_attempts,
            type(error).__name__,
            error,
            attempt.delay,
        )
        if self.on_retry is None:
            return
        try:
            self.on_retry(attempt)
        except Exception:
            # Reporting degrades, it never fails the data work.
            log.warning("on_retry callback %r failed; retrying anyway", self.on_retry, exc_info=True)

    def give_up(self, state: tenacity.RetryCallState) -> Any:
        error = _failure(state)
        log.error(
            "Giving up after attempt %s: %s; re-raising %s: %s",
            state.attempt_number,
            getattr(state, _STOP_REASON, "retries exhausted"),
            type(error).__name__,
            error,
        )
        raise error  # the original exception, with its traceback, never a tenacity.RetryError


def _failure(state: tenacity.RetryCallState) -> BaseException:
    error = state.outcome.exception() if state.outcome is not None else None
    if error is None:  # only failures are retried, so tenacity always has one here
        raise RuntimeError("tenacity reported a retry without an exception")
    return error


def retrying(
    settings: RetrySettings,
    classifier: ErrorClassifier = DEFAULT_CLASSIFIER,
    *,
    on_retry: Callable[[RetryAttempt], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tenacity.Retrying:
    """
    A ``tenacity.Retrying`` that retries transient errors only, with full jitter, ``max_attempts`` and ``budget``.

    :param settings: attempts, backoff and budget.
    :param classifier: decides what is transient; permanent errors are raised on their first occurrence.
    :param on_retry: called before each sleep with a :class:`RetryAttempt` (e.g. to record a heal event); if
        it raises, the failure is logged and retrying goes on.
    :param sleep: how to sleep (inject a fake one to test without waiting).
    :param rng: random source of the jitter (seed one for reproducible tests).
    :param clock: monotonic clock measuring the budget; inject one that a fake ``sleep`` advances in tests.
    """
    if not isinstance(settings, RetrySettings):
        raise TypeError(f"settings must be a RetrySettings, got {type(settings).__name__}")
    if not isinstance(classifier, ErrorClassifier):
        raise TypeError(f"classifier must be an ErrorClassifier, got {type(classifier).__name__}")
    hooks = _Hooks(settings, classifier, on_retry, clock)
    return tenacity.Retrying(
        sleep=sleep,
        stop=hooks.stop,
        wait=full_jitter_wait(settings, rng=rng),
        retry=tenacity.retry_if_exception(hooks.should_retry),
        before=hooks.before,
        before_sleep=hooks.before_sleep,
        retry_error_callback=hooks.give_up,
        reraise=True,
    )
