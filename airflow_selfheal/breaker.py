"""
The user-facing circuit breaker: declared once in a DAG file, used by callbacks, operators and a sensor.

.. code-block:: python

    orders_api = CircuitBreaker("orders_api", failure_threshold=3, open_for=timedelta(minutes=10))

    PythonOperator(
        ..., on_failure_callback=[my_alert, orders_api.on_failure], on_success_callback=orders_api.on_success
    )
    CircuitBreakerSensor(task_id="orders_api_closed", breaker=orders_api)

    def call_orders_api(**context):
        with orders_api.guard(context):
            return fetch()
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

from airflow_selfheal.exceptions import CircuitOpenError
from airflow_selfheal.healing.breaker_state import BreakerPolicy, Outcome, Transition
from airflow_selfheal.hooks.circuit_breaker import BreakerSnapshot, Change, CircuitBreakerHook, Origin
from airflow_selfheal.notifications.safe import notify_safely

if TYPE_CHECKING:
    from airflow_selfheal.triggers.circuit_breaker import CircuitBreakerTrigger

log = logging.getLogger(__name__)

WhenOpen = Literal["wait", "skip", "fail"]
WHEN_OPEN: tuple[str, ...] = ("wait", "skip", "fail")
_OPENING = (Transition.OPENED, Transition.FORCED_OPEN)
_CLOSING = (Transition.CLOSED, Transition.RESET)
# (breaker, task identity, try) whose outcome a guard already reported, so the task's callback does not count it again.
_REPORTED: set[tuple[str, str, int | None]] = set()
_LOCAL = threading.local()


class Classifier(Protocol):
    """What the breaker needs from an error classifier (such as ``healing.classify.ErrorClassifier``)."""

    def is_transient(self, error: BaseException) -> bool: ...


@dataclass(frozen=True)
class Caller:
    """Who is calling: identities for probe slots (most specific first) and where to attribute events."""

    identities: tuple[str, ...]
    origin: Origin
    try_number: int | None = None

    @property
    def reported_key(self) -> str | None:
        return self.identities[0] if self.identities[0].startswith("task:") else None


@dataclass(frozen=True)
class Permit:
    """
    The breaker's answer to one caller.

    :param allowed: the dependency may be called.
    :param probe: the call is a half-open probe; its outcome closes or re-opens the breaker.
    :param retry_at: when refused, the earliest time a new attempt may be admitted (``None``: unknown).
    :param state: the breaker's state (``unknown`` when the state store could not be reached).
    """

    breaker: str
    allowed: bool
    probe: bool
    retry_at: dt.datetime | None
    state: str
    caller: Caller


@dataclass(frozen=True)
class BreakerNotice:
    """What a notifier receives as ``context["circuit_breaker"]`` (templates: ``{{ circuit_breaker.name }}``)."""

    name: str
    event: Literal["opened", "closed"]
    transition: str
    state: str
    error: str | None
    next_probe_at: dt.datetime | None
    open_count: int


class CircuitBreaker:
    """
    Protects one dependency (an API, a database, a vendor feed) for every DAG and task that uses it.

    State lives in the state store under ``name``, so every worker sees the same breaker. Reporting
    (heal events, notifiers, DAG pauses) never fails a task; if the state store cannot be reached,
    calls are let through (logged) rather than failing the data task.

    :param name: the dependency's breaker name (1 to 200 characters), shared by every DAG that uses it.
    :param failure_threshold: open after this many consecutive counted failures (``None``: only the rate).
    :param failure_rate_threshold: open when this fraction (0 < x <= 1) of the calls in ``window`` failed.
    :param window: rate window: an ``int`` (last N calls) or a ``timedelta`` (calls of that long a time).
    :param minimum_calls: calls the window must hold before the rate counts.
    :param open_for: first cooldown; it doubles each time a probe fails.
    :param max_open_for: cap of the growing cooldown (default ``16 * open_for``).
    :param half_open_max_probes: probe calls let through at once after the cooldown.
    :param probe_timeout: a probe that never reports (its worker died) frees its slot after this long.
    :param when_open: what guarded work does while open: ``wait`` (the sensor defers; a guard inside an
        operator raises :class:`CircuitOpenError` so the task retries later), ``skip`` (the task is
        skipped, its interval stays unprocessed for catch-up) or ``fail`` (:class:`CircuitOpenError`).
    :param selfheal_conn_id: the state store's connection (default ``[selfheal] conn_id``).
    :param table_prefix: prefix of the state tables (default ``[selfheal] table_prefix``).
    :param schema: schema of the state tables (default ``[selfheal] schema``).
    :param notifiers: Airflow ``BaseNotifier`` instances (or callables taking a context) called when the
        breaker opens and when it closes; ``context["circuit_breaker"]`` is a :class:`BreakerNotice`.
    :param pause_dags: DAG ids paused through Airflow's REST API when the breaker opens and unpaused when it
        closes. Keep the DAGs that probe the dependency out of this list, or nothing will close the breaker.
    :param airflow_api_conn_id: connection of Airflow's REST API, used for ``pause_dags``.
    :param classifier: decides which errors count (default: transient errors count, permanent ones are
        reported but do not open the breaker).
    :param clock: returns the current aware UTC time (for tests).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = 5,
        failure_rate_threshold: float | None = None,
        window: int | dt.timedelta | None = None,
        minimum_calls: int | None = None,
        open_for: dt.timedelta = dt.timedelta(minutes=5),
        max_open_for: dt.timedelta | None = None,
        half_open_max_probes: int = 1,
        probe_timeout: dt.timedelta = dt.timedelta(minutes=30),
        when_open: WhenOpen = "wait",
        selfheal_conn_id: str | None = None,
        table_prefix: str | None = None,
        schema: str | None = None,
        notifiers: Sequence[Callable[[Any], Any]] = (),
        pause_dags: Sequence[str] = (),
        airflow_api_conn_id: str = "selfheal_airflow_api_default",
        classifier: Classifier | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise ValueError(f"name={name!r} must be a string of 1 to 200 characters")
        if when_open not in WHEN_OPEN:
            raise ValueError(f"when_open={when_open!r} must be one of {', '.join(WHEN_OPEN)}")
        if isinstance(pause_dags, str) or not all(isinstance(d, str) and d for d in pause_dags):
            raise ValueError(f"pause_dags must be a list of DAG ids, got {pause_dags!r}")
        for index, notifier in enumerate(notifiers):
            if not callable(notifier):
                raise ValueError(f"notifiers[{index}] must be a BaseNotifier or a callable, got {notifier!r}")
        self.name = name
        self.policy = BreakerPolicy(
            failure_threshold=failure_threshold,
            failure_rate_threshold=failure_rate_threshold,
            window=window,
            minimum_calls=minimum_calls,
            open_for=open_for,
            max_open_for=max_open_for,
            half_open_max_probes=half_open_max_probes,
            probe_timeout=probe_timeout,
        )
        self.when_open: WhenOpen = when_open
        self.selfheal_conn_id = selfheal_conn_id
        self.table_prefix = table_prefix
        self.schema = schema
        self.notifiers = tuple(notifiers)
        self.pause_dags = tuple(pause_dags)
        self.airflow_api_conn_id = airflow_api_conn_id
        self.classifier = classifier
        self.clock = clock

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, when_open={self.when_open!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Hooks hold engines and locks: copies (Airflow deep-copies operators) build their own lazily.
        return {k: v for k, v in self.__dict__.items() if k != "hook"}

    @cached_property
    def hook(self) -> CircuitBreakerHook:
        """The state store hook (created on first use, never at DAG parse time)."""
        return CircuitBreakerHook(
            self.selfheal_conn_id, table_prefix=self.table_prefix, schema=self.schema, clock=self.clock
        )

    # -- inside operators -----------------------------------------------------------------------

    def try_allow_call(self, context: Mapping[str, Any] | None = None, *, scope: str = "task") -> Permit:
        """
        Ask whether the dependency may be called now, without raising.

        :param context: the task context (default: Airflow's current context, if any).
        :param scope: ``task`` (the probe slot belongs to this task instance) or ``run`` (to the whole DAG
            run, so a gate such as the sensor takes the slot and the run's tasks report the outcome).
        """
        caller = self._caller(context, scope)
        try:
            change = self.hook.admit(self.name, self.policy, caller.identities, origin=caller.origin)
        except Exception:
            log.warning("Breaker %s: state store unreachable, letting the call through", self.name, exc_info=True)
            permit = Permit(self.name, True, False, None, "unknown", caller)
        else:
            admission = change.admission
            assert admission is not None
            permit = Permit(self.name, admission.allowed, admission.probe, admission.retry_at, admission.state, caller)
            self._after(change, context, None)
        if permit.allowed:
            _last_callers()[self.name] = caller
        return permit

    def allow_call(self, context: Mapping[str, Any] | None = None, *, scope: str = "task") -> Permit:
        """
        Like :meth:`try_allow_call`, but act per ``when_open`` when refused.

        :raises AirflowSkipException: refused and ``when_open="skip"``.
        :raises CircuitOpenError: refused and ``when_open`` is ``fail`` or ``wait``.
        """
        permit = self.try_allow_call(context, scope=scope)
        if not permit.allowed:
            self.refuse(permit)
        return permit

    def refuse(self, permit: Permit) -> None:
        """Raise what ``when_open`` asks for, for a refused ``permit``."""
        message = f"circuit breaker {self.name!r} is {permit.state}: the dependency was not called"
        if permit.retry_at is not None:
            message += f"; next probe at {permit.retry_at.isoformat()}"
        if self.when_open == "skip":
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(message)
        raise CircuitOpenError(message)

    @contextlib.contextmanager
    def guard(self, context: Mapping[str, Any] | None = None) -> Iterator[Permit]:
        """
        Run a block only while the breaker allows it, and report how it went.

        The block's exception is re-raised after it is reported; Airflow's control-flow exceptions
        (skip, defer, reschedule) only give a probe slot back.
        """
        permit = self.allow_call(context)
        try:
            yield permit
        except BaseException as exc:
            if _is_control_flow(exc):
                self._report(permit.caller, Outcome.IGNORED, None, context)
            else:
                self.record_failure(exc, context, permit=permit)
            raise
        self.record_success(context, permit=permit)

    def record_success(self, context: Mapping[str, Any] | None = None, *, permit: Permit | None = None) -> None:
        """Report that a call to the dependency succeeded (never raises)."""
        self._report(self._reporter(context, permit), Outcome.SUCCESS, None, context)

    def record_failure(
        self, error: BaseException | None, context: Mapping[str, Any] | None = None, *, permit: Permit | None = None
    ) -> None:
        """
        Report that a call failed (never raises).

        Transient errors (per the classifier), task timeouts and failures without an exception (a
        killed task) count; others, such as bugs, are reported as a ``breaker_error_ignored`` heal
        event and do not move the breaker.
        """
        self._report_error(self._reporter(context, permit), error, context)

    def _report_error(self, caller: Caller, error: BaseException | None, context: Mapping[str, Any] | None) -> None:
        """Count transient errors and task timeouts; report the rest as ignored."""
        if error is None:
            self._report(caller, Outcome.FAILURE, "the task failed without an exception (killed or timed out)", context)
            return
        text = f"{type(error).__name__}: {error}"
        try:
            # A task timeout is never worth a retry, but for a breaker it is the classic sign of a hung dependency.
            counted = _is_task_timeout(error) or self._classifier().is_transient(error)
        except Exception:
            log.warning("Breaker %s: classifying %r failed; counting it", self.name, error, exc_info=True)
            counted = True
        if counted:
            self._report(caller, Outcome.FAILURE, text, context)
            return
        self._report(caller, Outcome.IGNORED, text, context)
        try:
            self.hook.record_ignored_error(self.name, text, origin=caller.origin)
        except Exception:
            log.warning("Breaker %s: could not report ignored error", self.name, exc_info=True)

    # -- task callbacks -------------------------------------------------------------------------

    def on_success(self, context: Mapping[str, Any]) -> None:
        """``on_success_callback``: the task's calls to the dependency worked."""
        caller = self._caller(context, "task")
        if not self._already_reported(caller):
            self._report(caller, Outcome.SUCCESS, None, context)

    def on_failure(self, context: Mapping[str, Any]) -> None:
        """``on_failure_callback`` (and ``on_retry_callback``): count the task's error if it is transient."""
        caller = self._caller(context, "task")
        if self._already_reported(caller):
            return
        error = context.get("exception")
        self._report_error(caller, error if isinstance(error, BaseException) else None, context)

    on_retry = on_failure

    # -- manual control -------------------------------------------------------------------------

    def state(self) -> BreakerSnapshot | None:
        """The breaker as stored now (``None`` before its first use)."""
        return self.hook.get(self.name, self.policy)

    def reset(self, context: Mapping[str, Any] | None = None) -> BreakerSnapshot:
        """Close the breaker by hand; notifies and unpauses like a probe success."""
        change = self.hook.reset(self.name, origin=_origin(context), policy=self.policy)
        self._after(change, context, None)
        return change.snapshot

    def force_open(
        self,
        open_for: dt.timedelta | None = None,
        *,
        reason: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> BreakerSnapshot:
        """Open the breaker by hand, for ``open_for`` or (``None``) until :meth:`reset`; notifies and pauses."""
        change = self.hook.force_open(self.name, open_for, reason=reason, origin=_origin(context), policy=self.policy)
        self._after(change, context, change.snapshot.last_error)
        return change.snapshot

    def trigger(self, *, poll_interval: float = 30.0) -> CircuitBreakerTrigger:
        """A trigger that fires once this breaker may be called again (for deferrable operators)."""
        from airflow_selfheal.triggers.circuit_breaker import CircuitBreakerTrigger

        return CircuitBreakerTrigger(
            breaker_name=self.name,
            selfheal_conn_id=self.hook.selfheal_conn_id,
            table_prefix=self.hook.table_prefix,
            schema=self.hook.schema,
            half_open_max_probes=self.policy.half_open_max_probes,
            probe_timeout=self.policy.probe_timeout.total_seconds(),
            poll_interval=poll_interval,
        )

    def set_dags_paused(self, paused: bool) -> dict[str, bool]:
        """
        Pause (or unpause) every DAG of ``pause_dags`` through Airflow's REST API.

        :return: for each DAG id, whether the API accepted the change; failures are logged, never raised.
        """
        if not self.pause_dags:
            return {}
        from airflow_selfheal.hooks.airflow_api import AirflowApiHook

        results: dict[str, bool] = {}
        try:
            # One retry: this runs in a task's callback, which must not hang on an unreachable api-server.
            api = AirflowApiHook(self.airflow_api_conn_id, timeout=10.0, retries=1)
        except Exception:
            log.warning("Breaker %s: no Airflow API connection to (un)pause DAGs", self.name, exc_info=True)
            return dict.fromkeys(self.pause_dags, False)
        for dag_id in self.pause_dags:
            try:
                api.set_paused(dag_id, paused)
                results[dag_id] = True
            except Exception:
                log.warning("Breaker %s: could not set paused=%s on DAG %s", self.name, paused, dag_id, exc_info=True)
                results[dag_id] = False
        return results

    # -- internals ------------------------------------------------------------------------------

    def _classifier(self) -> Classifier:
        if self.classifier is not None:
            return self.classifier
        from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER

        return DEFAULT_CLASSIFIER

    def _report(
        self, caller: Caller, outcome: Outcome, error: str | None, context: Mapping[str, Any] | None
    ) -> Change | None:
        try:
            change = self.hook.record(
                self.name, self.policy, outcome, caller.identities, error=error, origin=caller.origin
            )
        except Exception:
            log.warning("Breaker %s: could not record %s", self.name, outcome.value, exc_info=True)
            return None
        key = caller.reported_key
        if key is not None:
            if len(_REPORTED) > 10_000:
                _REPORTED.clear()
            _REPORTED.add((self.name, key, caller.try_number))
        self._after(change, context, error)
        return change

    def _already_reported(self, caller: Caller) -> bool:
        key = caller.reported_key
        return key is not None and (self.name, key, caller.try_number) in _REPORTED

    def _after(self, change: Change, context: Mapping[str, Any] | None, error: str | None) -> None:
        """Side effects of a transition this process made: notifiers and DAG pauses."""
        if change.transition in _OPENING:
            self._announce("opened", change, context, error)
            self.set_dags_paused(True)
        elif change.transition in _CLOSING:
            self._announce("closed", change, context, error)
            self.set_dags_paused(False)

    def _announce(
        self, event: Literal["opened", "closed"], change: Change, context: Mapping[str, Any] | None, error: str | None
    ) -> None:
        if not self.notifiers:
            return
        assert change.transition is not None
        snapshot = change.snapshot
        notice = BreakerNotice(
            self.name,
            event,
            change.transition.value,
            snapshot.state,
            error,
            snapshot.next_probe_at,
            snapshot.open_count,
        )
        notify_safely(self.notifiers, {**(context or {}), "circuit_breaker": notice}, what=f"breaker {event}")

    def _caller(self, context: Mapping[str, Any] | None, scope: str) -> Caller:
        if scope not in ("task", "run"):
            raise ValueError(f"scope={scope!r} must be 'task' or 'run'")
        ctx = context if context is not None else _current_context()
        if ctx is not None:
            ti = ctx.get("ti") or ctx.get("task_instance")
            dag_id = getattr(ti, "dag_id", None) or getattr(ctx.get("dag"), "dag_id", None)
            run_id = getattr(ti, "run_id", None) or ctx.get("run_id")
            task_id = getattr(ti, "task_id", None) or getattr(ctx.get("task"), "task_id", None)
            if dag_id and run_id:
                map_index = getattr(ti, "map_index", None)
                run_key = f"run:{dag_id}/{run_id}"
                task_key = f"task:{dag_id}/{run_id}/{task_id}/{-1 if map_index is None else map_index}"
                identities = (run_key, task_key) if scope == "run" else (task_key, run_key)
                return Caller(identities, Origin(dag_id, task_id, run_id), getattr(ti, "try_number", None))
        return Caller((f"call:{uuid.uuid4()}",), Origin())

    def _reporter(self, context: Mapping[str, Any] | None, permit: Permit | None) -> Caller:
        """Who reports an outcome: the permit's caller, else the context's, else this thread's last admitted caller."""
        if permit is not None:
            return permit.caller
        if context is not None or _current_context() is not None:
            return self._caller(context, "task")
        return _last_callers().get(self.name) or self._caller(None, "task")


def _origin(context: Mapping[str, Any] | None) -> Origin | None:
    if context is None:
        return None
    ti = context.get("ti")
    return Origin(getattr(ti, "dag_id", None), getattr(ti, "task_id", None), getattr(ti, "run_id", None))


def _current_context() -> Mapping[str, Any] | None:
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:
        return None


def _last_callers() -> dict[str, Caller]:
    callers: dict[str, Caller] | None = getattr(_LOCAL, "callers", None)
    if callers is None:
        callers = _LOCAL.callers = {}
    return callers


def _is_control_flow(error: BaseException) -> bool:
    """Airflow's skip/defer/reschedule signals and a nested breaker's refusal say nothing about the dependency."""
    if isinstance(error, CircuitOpenError):
        return True
    from airflow.sdk.exceptions import AirflowRescheduleException, AirflowSkipException, TaskDeferred

    return isinstance(error, AirflowSkipException | AirflowRescheduleException | TaskDeferred)


def _is_task_timeout(error: BaseException) -> bool:
    from airflow.sdk.exceptions import AirflowTaskTimeout

    return isinstance(error, AirflowTaskTimeout)
