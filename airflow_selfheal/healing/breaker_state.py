"""
The circuit breaker as a pure state machine: no I/O, the time is always passed in.

States: ``closed`` (calls go through, outcomes are counted), ``open`` (calls are refused until
``next_probe_at``), ``half_open`` (at most ``half_open_max_probes`` probe calls go through; a probe
success closes the breaker, a probe failure re-opens it with a doubled, capped cooldown).

Persistence (:mod:`airflow_selfheal.hooks.circuit_breaker`) reads a :class:`BreakerState`, applies
one of the functions below and writes the result back with a compare-and-set, so every process
runs exactly this logic.

Probe slots are leases held by *identities* (strings naming a task or a DAG run). A caller presents
every identity it has (e.g. its task and its DAG run): a lease held by any of them makes the caller
the probe, so a sensor can take the slot for its DAG run and the run's task reports the result.
Leases expire after ``probe_timeout`` so a probe whose worker died cannot wedge the breaker.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from airflow_selfheal.store.schema import CLOSED, HALF_OPEN, OPEN

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Admission",
    "BreakerPolicy",
    "BreakerState",
    "Outcome",
    "Probe",
    "Transition",
    "admit",
    "force_open",
    "may_proceed",
    "record",
    "reset",
]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_COUNT_WINDOW = 10_000  # the outcomes of a count window are stored as one character each


class Outcome(enum.StrEnum):
    """What a guarded call did: failed in a way that counts, succeeded, or failed in a way that does not count."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class Transition(enum.StrEnum):
    """A change of state; the heal event kind is ``breaker_<value>``."""

    OPENED = "opened"
    HALF_OPEN = "half_open"
    CLOSED = "closed"
    PROBE_FAILED = "probe_failed"
    FORCED_OPEN = "forced_open"
    RESET = "reset"


@dataclass(frozen=True)
class BreakerPolicy:
    """
    When a breaker opens and for how long.

    :param failure_threshold: open after this many consecutive counted failures (``None``: only the rate).
    :param failure_rate_threshold: open when the fraction of failed calls in the window reaches this
        value, 0 < x <= 1 (``None``: only consecutive failures).
    :param window: the rate window: an ``int`` is the last N calls, a ``timedelta`` the calls of that
        long a time (in ``window_buckets`` buckets, so it slides in steps of ``window / window_buckets``).
    :param minimum_calls: calls the window must hold before the rate may open the breaker
        (default: the window size for count windows, capped at 10; 10 for time windows).
    :param open_for: first cooldown before a probe may go through.
    :param max_open_for: cap of the cooldown, which doubles each time a probe fails (default ``open_for * 16``).
    :param half_open_max_probes: probe calls allowed at once in half-open.
    :param probe_timeout: a probe that reports nothing for this long gives its slot back.
    :param window_buckets: buckets of a time window.
    """

    failure_threshold: int | None = 5
    failure_rate_threshold: float | None = None
    window: int | dt.timedelta | None = None
    minimum_calls: int | None = None
    open_for: dt.timedelta = dt.timedelta(minutes=5)
    max_open_for: dt.timedelta | None = None
    half_open_max_probes: int = 1
    probe_timeout: dt.timedelta = dt.timedelta(minutes=30)
    window_buckets: int = 10

    def __post_init__(self) -> None:
        if self.failure_threshold is None and self.failure_rate_threshold is None:
            raise ValueError("set failure_threshold or failure_rate_threshold (or both)")
        if self.failure_threshold is not None and (
            not isinstance(self.failure_threshold, int) or self.failure_threshold < 1
        ):
            raise ValueError(f"failure_threshold must be a positive int, got {self.failure_threshold!r}")
        if self.failure_rate_threshold is not None:
            if not 0 < self.failure_rate_threshold <= 1:
                raise ValueError(f"failure_rate_threshold is a fraction in (0, 1], got {self.failure_rate_threshold!r}")
            if self.window is None:
                raise ValueError("failure_rate_threshold needs window= (a number of calls or a timedelta)")
        if isinstance(self.window, bool) or not (self.window is None or isinstance(self.window, int | dt.timedelta)):
            raise ValueError(f"window must be an int (calls) or a timedelta, got {self.window!r}")
        if isinstance(self.window, int) and not 1 <= self.window <= MAX_COUNT_WINDOW:
            raise ValueError(f"window must be between 1 and {MAX_COUNT_WINDOW} calls, got {self.window}")
        if isinstance(self.window, dt.timedelta) and self.window <= dt.timedelta(0):
            raise ValueError(f"window must be a positive timedelta, got {self.window!r}")
        if not isinstance(self.window_buckets, int) or self.window_buckets < 1:
            raise ValueError(f"window_buckets must be a positive int, got {self.window_buckets!r}")
        if self.minimum_calls is None:
            default = min(self.window, 10) if isinstance(self.window, int) else 10
            object.__setattr__(self, "minimum_calls", default)
        elif not isinstance(self.minimum_calls, int) or self.minimum_calls < 1:
            raise ValueError(f"minimum_calls must be a positive int, got {self.minimum_calls!r}")
        elif isinstance(self.window, int) and self.minimum_calls > self.window:
            raise ValueError(f"minimum_calls={self.minimum_calls} can never be reached in a window of {self.window}")
        if self.open_for <= dt.timedelta(0):
            raise ValueError(f"open_for must be a positive timedelta, got {self.open_for!r}")
        if self.max_open_for is None:
            object.__setattr__(self, "max_open_for", self.open_for * 16)
        elif self.max_open_for < self.open_for:
            raise ValueError(f"max_open_for={self.max_open_for} is shorter than open_for={self.open_for}")
        if not isinstance(self.half_open_max_probes, int) or self.half_open_max_probes < 1:
            raise ValueError(f"half_open_max_probes must be a positive int, got {self.half_open_max_probes!r}")
        if self.probe_timeout <= dt.timedelta(0):
            raise ValueError(f"probe_timeout must be a positive timedelta, got {self.probe_timeout!r}")

    @property
    def bucket_us(self) -> int:
        """Length of one time-window bucket in microseconds (0 for count windows)."""
        if not isinstance(self.window, dt.timedelta):
            return 0
        return max(1, _micros(self.window) // self.window_buckets)

    def bucket_start(self, index: int) -> dt.datetime:
        """When time-window bucket ``index`` begins."""
        return _EPOCH + dt.timedelta(microseconds=index * self.bucket_us)

    def cooldown(self, open_count: int) -> dt.timedelta:
        """How long the ``open_count``-th consecutive opening lasts: ``open_for`` doubled per re-open, capped."""
        cap = self.max_open_for or self.open_for
        exponent = max(0, open_count - 1)
        if exponent >= 64:
            return cap
        try:
            return min(self.open_for * (2**exponent), cap)
        except OverflowError:
            return cap


@dataclass(frozen=True)
class Probe:
    """A half-open probe slot held by ``owner`` since ``acquired_at``."""

    owner: str
    acquired_at: dt.datetime


@dataclass(frozen=True)
class BreakerState:
    """
    Everything the breaker remembers.

    :param outcomes: count window, oldest first: ``"1"`` a counted failure, ``"0"`` a success.
    :param buckets: time window: ``(bucket index, calls, failures)``, oldest first.
    :param open_count: openings since the breaker was last closed (drives the cooldown growth).
    """

    state: str = CLOSED
    consecutive_failures: int = 0
    outcomes: str = ""
    buckets: tuple[tuple[int, int, int], ...] = ()
    opened_at: dt.datetime | None = None
    next_probe_at: dt.datetime | None = None
    open_count: int = 0
    probes: tuple[Probe, ...] = field(default=())
    last_error: str | None = None

    def window_totals(self, policy: BreakerPolicy, now: dt.datetime) -> tuple[int, int]:
        """``(calls, failures)`` in the window as of ``now``."""
        if isinstance(policy.window, int):
            recent = self.outcomes[-policy.window :]
            return len(recent), recent.count("1")
        if isinstance(policy.window, dt.timedelta):
            oldest = _micros(now) // policy.bucket_us - policy.window_buckets
            live = [b for b in self.buckets if b[0] > oldest]
            return sum(b[1] for b in live), sum(b[2] for b in live)
        return 0, 0


@dataclass(frozen=True)
class Admission:
    """
    The answer to "may I call the dependency now?".

    :param allowed: the call may go ahead.
    :param probe: the call is a half-open probe: its outcome decides the breaker's state.
    :param retry_at: when refused, the earliest time asking again may succeed (``None``: unknown or never).
    :param state: the breaker state after the question was answered.
    """

    allowed: bool
    probe: bool
    retry_at: dt.datetime | None
    state: str


def _micros(value: dt.timedelta | dt.datetime) -> int:
    delta = value - _EPOCH if isinstance(value, dt.datetime) else value
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _push(policy: BreakerPolicy, state: BreakerState, now: dt.datetime, failed: bool) -> BreakerState:
    """Add one outcome to the window."""
    if isinstance(policy.window, int):
        return replace(state, outcomes=(state.outcomes + ("1" if failed else "0"))[-policy.window :], buckets=())
    if isinstance(policy.window, dt.timedelta):
        index = _micros(now) // policy.bucket_us
        oldest = index - policy.window_buckets
        kept = {b[0]: b for b in state.buckets if b[0] > oldest}
        _, calls, failures = kept.get(index, (index, 0, 0))
        kept[index] = (index, calls + 1, failures + int(failed))
        return replace(state, buckets=tuple(kept[i] for i in sorted(kept)), outcomes="")
    return state


def _should_open(policy: BreakerPolicy, state: BreakerState, now: dt.datetime) -> bool:
    if policy.failure_threshold is not None and state.consecutive_failures >= policy.failure_threshold:
        return True
    if policy.failure_rate_threshold is None:
        return False
    calls, failures = state.window_totals(policy, now)
    return calls >= (policy.minimum_calls or 1) and failures >= policy.failure_rate_threshold * calls


def _opened(
    policy: BreakerPolicy, state: BreakerState, now: dt.datetime, error: str | None, open_for: dt.timedelta | None
) -> BreakerState:
    open_count = state.open_count + 1
    cooldown = policy.cooldown(open_count) if open_for is None else open_for
    return BreakerState(
        state=OPEN,
        opened_at=now,
        next_probe_at=now + cooldown,
        open_count=open_count,
        last_error=error if error is not None else state.last_error,
    )


def _live_probes(policy: BreakerPolicy, state: BreakerState, now: dt.datetime) -> tuple[Probe, ...]:
    return tuple(p for p in state.probes if p.acquired_at + policy.probe_timeout > now)


def _closed(state: BreakerState) -> BreakerState:
    return BreakerState(last_error=state.last_error)


def admit(
    policy: BreakerPolicy, state: BreakerState, now: dt.datetime, identities: Sequence[str]
) -> tuple[BreakerState, Admission, Transition | None]:
    """
    Decide whether a caller known by ``identities`` may call the dependency now.

    Closed: yes. Open: no, until ``next_probe_at``, when the breaker turns half-open and this caller
    becomes its first probe. Half-open: yes if one of the caller's identities already holds a probe
    slot or a slot is free (the caller takes it under ``identities[0]``).
    """
    if not identities:
        raise ValueError("identities must name the caller at least once")
    if state.state == CLOSED:
        return state, Admission(True, False, None, CLOSED), None
    if state.state == OPEN:
        if state.next_probe_at is None or now < state.next_probe_at:
            return state, Admission(False, False, state.next_probe_at, OPEN), None
        probing = replace(state, state=HALF_OPEN, probes=(Probe(identities[0], now),))
        return probing, Admission(True, True, None, HALF_OPEN), Transition.HALF_OPEN
    live = _live_probes(policy, state, now)
    if any(p.owner in identities for p in live):
        return replace(state, probes=live), Admission(True, True, None, HALF_OPEN), None
    if len(live) < policy.half_open_max_probes:
        taken = replace(state, probes=(*live, Probe(identities[0], now)))
        return taken, Admission(True, True, None, HALF_OPEN), None
    retry_at = min(p.acquired_at for p in live) + policy.probe_timeout
    return replace(state, probes=live), Admission(False, False, retry_at, HALF_OPEN), None


def record(
    policy: BreakerPolicy,
    state: BreakerState,
    now: dt.datetime,
    outcome: Outcome,
    identities: Sequence[str],
    error: str | None = None,
) -> tuple[BreakerState, Transition | None]:
    """
    Apply the outcome of a call made by a caller known by ``identities``.

    Closed: successes reset the consecutive count, counted failures may open the breaker. Open:
    outcomes change nothing during the cooldown; after it, with no probe admitted yet, an outcome
    acts as the probe's (so breakers driven only by task callbacks heal too). Half-open: only a
    probe's outcome matters; success closes, a counted failure re-opens with a longer cooldown, an
    ignored failure gives the slot back.
    """
    if state.state == CLOSED:
        if outcome is Outcome.IGNORED:
            return state, None
        failed = outcome is Outcome.FAILURE
        counted = replace(state, consecutive_failures=state.consecutive_failures + 1 if failed else 0)
        counted = _push(policy, counted, now, failed)
        if failed and _should_open(policy, counted, now):
            return _opened(policy, counted, now, error, None), Transition.OPENED
        return counted, None
    if state.state == OPEN:
        if state.next_probe_at is None or now < state.next_probe_at or outcome is Outcome.IGNORED:
            return state, None  # a call admitted before the breaker opened, or one nobody gated
        # The cooldown is over and nobody asked to probe (e.g. tasks wired only with the breaker's
        # callbacks): this outcome is the probe's.
        if outcome is Outcome.SUCCESS:
            return _closed(state), Transition.CLOSED
        return _opened(policy, state, now, error, None), Transition.PROBE_FAILED
    live = _live_probes(policy, state, now)
    if not any(p.owner in identities for p in live):
        # Not a probe (admitted before the breaker opened), or a probe whose slot already expired.
        return state, None
    if outcome is Outcome.SUCCESS:
        return _closed(state), Transition.CLOSED
    if outcome is Outcome.FAILURE:
        return _opened(policy, state, now, error, None), Transition.PROBE_FAILED
    return replace(state, probes=tuple(p for p in live if p.owner not in identities)), None


def force_open(
    policy: BreakerPolicy, state: BreakerState, now: dt.datetime, open_for: dt.timedelta | None, reason: str | None
) -> tuple[BreakerState, Transition]:
    """Open the breaker by hand: for ``open_for``, or until :func:`reset` when it is ``None``."""
    opened = _opened(policy, state, now, reason, open_for or dt.timedelta(0))
    return replace(opened, next_probe_at=None if open_for is None else opened.next_probe_at), Transition.FORCED_OPEN


def reset(state: BreakerState) -> tuple[BreakerState, Transition]:
    """Close the breaker by hand and forget every counter."""
    return _closed(state), Transition.RESET


def may_proceed(
    state: BreakerState, now: dt.datetime, *, half_open_max_probes: int, probe_timeout: dt.timedelta
) -> bool:
    """Whether asking :func:`admit` now could succeed for a new caller (read-only; the trigger's question)."""
    if state.state == CLOSED:
        return True
    if state.state == OPEN:
        return state.next_probe_at is not None and now >= state.next_probe_at
    live = [p for p in state.probes if p.acquired_at + probe_timeout > now]
    return len(live) < half_open_max_probes
