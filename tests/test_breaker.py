"""CircuitBreaker: guards, callbacks composed with the user's own, notifiers, degraded stores, dag.test() runs."""

from __future__ import annotations

import copy
import datetime as dt
import pickle
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import BaseNotifier
from airflow.sdk.exceptions import AirflowSkipException

from airflow_selfheal.breaker import CircuitBreaker
from airflow_selfheal.exceptions import CircuitOpenError, PermanentError, TransientError
from airflow_selfheal.hooks.heal_events import HealEventHook
from tests.airflow_harness import AirflowDb
from tests.conftest import Database

T0 = dt.datetime(2026, 6, 1, 8, tzinfo=dt.UTC)
sqlite_only = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


class FileNotifier(BaseNotifier):
    """A real BaseNotifier with a templated message, appending each notification to a file."""

    template_fields = ("message",)

    def __init__(self, path: Path, message: str) -> None:
        super().__init__()
        self.path = path
        self.message = message

    def notify(self, context: Any) -> None:
        with self.path.open("a") as out:
            out.write(self.message + "\n")


class BrokenNotifier(BaseNotifier):
    def notify(self, context: Any) -> None:
        raise ConnectionError("smtp server is down")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def task_context(task_id: str = "load", run_id: str = "scheduled__1", exception: BaseException | None = None) -> dict:
    """The part of an Airflow task context the breaker reads (the real one comes from dag.test() below)."""
    ti = SimpleNamespace(dag_id="orders", task_id=task_id, run_id=run_id, map_index=-1, try_number=1)
    return {"ti": ti, "run_id": run_id, "exception": exception}


@pytest.fixture
def clock() -> list[dt.datetime]:
    return [T0]


@pytest.fixture
def make_breaker(database: Database, table_prefix: str, clock: list[dt.datetime]) -> Any:
    def make(**kwargs: Any) -> CircuitBreaker:
        kwargs.setdefault("failure_threshold", 2)
        kwargs.setdefault("open_for", dt.timedelta(minutes=1))
        kwargs.setdefault("clock", lambda: clock[0])
        return CircuitBreaker(
            kwargs.pop("name", f"api_{uuid.uuid4().hex[:6]}"),
            selfheal_conn_id=database.conn_id,
            table_prefix=table_prefix,
            **kwargs,
        )

    return make


@sqlite_only
def test_guard_stops_calling_the_dependency_while_open(make_breaker: Any, clock: list[dt.datetime]) -> None:
    breaker: CircuitBreaker = make_breaker(when_open="fail")
    calls = []

    def call_dependency(ok: bool) -> None:
        calls.append(ok)
        if not ok:
            raise TransientError("503 Service Unavailable")

    for _ in range(2):
        with pytest.raises(TransientError), breaker.guard():
            call_dependency(False)
    for _ in range(3):
        with pytest.raises(CircuitOpenError, match="next probe at"), breaker.guard():
            call_dependency(True)
    assert len(calls) == 2, "while open the dependency receives no calls"

    clock[0] += dt.timedelta(minutes=1)
    with breaker.guard() as permit:
        assert permit.probe
        call_dependency(True)
    assert breaker.state().state == "closed"  # type: ignore[union-attr]
    kinds = [e.kind for e in breaker.hook.events.list_events(pipeline=breaker.name)]
    assert kinds == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    opened = breaker.hook.events.list_events(pipeline=breaker.name, kind="breaker_opened")[0]
    assert opened.detail["error"] == "TransientError: 503 Service Unavailable"


@sqlite_only
def test_skip_mode_and_permanent_errors(make_breaker: Any) -> None:
    breaker: CircuitBreaker = make_breaker(when_open="skip", failure_threshold=1)
    for _ in range(3):
        with pytest.raises(PermanentError), breaker.guard():
            raise PermanentError("column 'amount' is missing: a bug, not an outage")
    assert breaker.state().state == "closed", "permanent errors do not open the breaker"  # type: ignore[union-attr]
    ignored = breaker.hook.events.list_events(pipeline=breaker.name, kind="breaker_error_ignored")
    assert len(ignored) == 3 and "column 'amount'" in ignored[0].detail["error"]

    with pytest.raises(TransientError), breaker.guard():
        raise TransientError("timeout")
    with pytest.raises(AirflowSkipException), breaker.guard():
        pytest.fail("the guarded block must not run while open")


@sqlite_only
def test_allow_call_and_record_without_context_credit_the_same_caller(make_breaker: Any, clock: list) -> None:
    breaker: CircuitBreaker = make_breaker(failure_threshold=1, half_open_max_probes=1)
    breaker.force_open(dt.timedelta(seconds=5))
    clock[0] += dt.timedelta(seconds=5)
    permit = breaker.allow_call()
    assert permit.probe
    assert not breaker.try_allow_call().allowed, "a second caller waits for the probe"
    breaker.record_success()  # no permit, no context: this thread's admitted caller
    assert breaker.state().state == "closed"  # type: ignore[union-attr]


@sqlite_only
def test_callbacks_count_once_when_a_guard_already_reported(make_breaker: Any) -> None:
    breaker: CircuitBreaker = make_breaker(failure_threshold=2)
    context = task_context(exception=TransientError("503"))
    with pytest.raises(TransientError), breaker.guard(context):
        raise TransientError("503")
    breaker.on_failure(context)  # the same task's failure callback: already counted by the guard
    assert breaker.state().consecutive_failures == 1  # type: ignore[union-attr]
    breaker.on_failure(task_context(task_id="other", exception=TransientError("503")))
    assert breaker.state().state == "open"  # type: ignore[union-attr]


@sqlite_only
def test_task_timeouts_and_killed_tasks_count(make_breaker: Any) -> None:
    from airflow.sdk.exceptions import AirflowTaskTimeout

    breaker: CircuitBreaker = make_breaker(failure_threshold=2)
    breaker.on_failure(task_context(task_id="a", exception=AirflowTaskTimeout("execution_timeout of 600s")))
    breaker.on_failure(task_context(task_id="b", exception=None))  # killed: no exception in the context
    assert breaker.state().state == "open"  # type: ignore[union-attr]


@sqlite_only
def test_notifiers_on_open_and_close_and_a_broken_one_fails_nothing(
    make_breaker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "notes.txt"
    good = FileNotifier(out, "{{ circuit_breaker.name }} {{ circuit_breaker.event }}: {{ circuit_breaker.error }}")
    breaker: CircuitBreaker = make_breaker(failure_threshold=1, notifiers=[BrokenNotifier(), good])
    breaker.on_failure(task_context(exception=TransientError("upstream 502")))
    breaker.reset()
    breaker.on_failure(task_context(run_id="scheduled__2", exception=TransientError("upstream 504")))
    assert lines(out) == [
        f"{breaker.name} opened: TransientError: upstream 502",
        f"{breaker.name} closed: None",
        f"{breaker.name} opened: TransientError: upstream 504",
    ], "templates render per notification (the user's template is not consumed by the first one)"
    assert good.message.startswith("{{"), "the user's notifier keeps its template"
    assert "failed to send breaker opened" in caplog.text and "smtp server is down" in caplog.text


@sqlite_only
def test_unreachable_store_and_api_degrade_without_failing_the_task(
    make_breaker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SELFHEAL_DOWN", "postgresql://postgres@127.0.0.1:9/test?connect_timeout=2")
    breaker = CircuitBreaker("down", selfheal_conn_id="selfheal_down")
    with breaker.guard() as permit:  # the store is down: the call goes through rather than failing the task
        assert (permit.allowed, permit.state) == (True, "unknown")
    breaker.on_failure(task_context(exception=TransientError("503")))  # logged, not raised

    monkeypatch.setenv("AIRFLOW_CONN_SELFHEAL_API_DOWN", '{"conn_type": "http", "host": "127.0.0.1", "port": 9}')
    paused = CircuitBreaker("x", pause_dags=["orders_daily"], airflow_api_conn_id="selfheal_api_down")
    assert paused.set_dags_paused(True) == {"orders_daily": False}


@sqlite_only
def test_breaker_copies_and_pickles_after_use(make_breaker: Any) -> None:
    breaker: CircuitBreaker = make_breaker(clock=None)
    breaker.record_success()
    assert "hook" in breaker.__dict__
    for clone in (copy.deepcopy(breaker), pickle.loads(pickle.dumps(breaker))):
        assert "hook" not in clone.__dict__ and clone.policy == breaker.policy
        assert clone.state() is not None, "a copy finds the same stored breaker"


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="when_open"):
        CircuitBreaker("x", when_open="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pause_dags"):
        CircuitBreaker("x", pause_dags="orders")
    with pytest.raises(ValueError, match=r"notifiers\[0\]"):
        CircuitBreaker("x", notifiers=["slack"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker("")


def test_airflow_accepts_lists_of_callables_and_notifiers_as_task_callbacks() -> None:
    """What the composition below relies on, read from the installed Airflow rather than assumed."""
    import inspect

    from airflow.sdk.bases.operator import BaseOperator
    from airflow.sdk.execution_time import task_runner

    runner = inspect.getsource(task_runner._run_task_state_change_callbacks)
    assert "for i, callback in enumerate(getattr(task, kind))" in runner
    assert "except Exception" in runner, "one failing callback does not stop the others"
    signature = inspect.signature(BaseOperator.__init__)
    assert "list[TaskStateChangeCallback]" in str(signature.parameters["on_failure_callback"].annotation)


# -- real runs with dag.test() --------------------------------------------------------------------------------


@sqlite_only
def test_dag_test_callbacks_compose_skip_while_open_and_probe_closes(
    airflow_db: AirflowDb, make_breaker: Any, clock: list[dt.datetime], tmp_path: Path
) -> None:
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG

    from airflow_selfheal.sensors.circuit_breaker import CircuitBreakerSensor

    calls, user_log, alerts = tmp_path / "calls.txt", tmp_path / "user.txt", tmp_path / "alerts.txt"
    upstream_up = tmp_path / "upstream_up"
    breaker: CircuitBreaker = make_breaker(
        failure_threshold=1,
        when_open="skip",
        notifiers=[FileNotifier(alerts, "{{ circuit_breaker.event }} by {{ ti.task_id }}")],
    )

    def call_api() -> None:
        with calls.open("a") as out:
            out.write("call\n")
        if not upstream_up.exists():
            raise TransientError("orders API answered 503")

    def users_own_callback(context: Any) -> None:
        with user_log.open("a") as out:
            out.write(f"{context['ti'].task_id} failed: {context['exception']}\n")

    with DAG(f"breaker_compose_{uuid.uuid4().hex[:6]}", schedule=None, start_date=T0, catchup=False) as dag:
        gate = CircuitBreakerSensor(task_id="orders_api_closed", breaker=breaker)
        load = PythonOperator(
            task_id="load_orders",
            python_callable=call_api,
            on_failure_callback=[
                users_own_callback,
                FileNotifier(user_log, "notifier saw {{ ti.task_id }}"),
                breaker.on_failure,
            ],
            on_success_callback=breaker.on_success,
        )
        gate >> load

    first = airflow_db.run_dag(dag, logical_date=T0)
    assert first.state == "failed"
    assert lines(user_log) == ["load_orders failed: orders API answered 503", "notifier saw load_orders"]
    assert breaker.state().state == "open"  # type: ignore[union-attr]
    assert lines(alerts) == ["opened by load_orders"]

    second = airflow_db.run_dag(dag, logical_date=T0 + dt.timedelta(hours=1))
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert states == {"orders_api_closed": "skipped", "load_orders": "skipped"}
    assert len(lines(calls)) == 1, "while open the dependency received 0 calls"

    upstream_up.touch()
    clock[0] += dt.timedelta(minutes=1)
    third = airflow_db.run_dag(dag, logical_date=T0 + dt.timedelta(hours=2))
    assert third.state == "success"
    assert breaker.state().state == "closed"  # type: ignore[union-attr]
    assert lines(alerts) == ["opened by load_orders", "closed by load_orders"]
    events = HealEventHook(breaker.hook.selfheal_conn_id, table_prefix=breaker.hook.table_prefix).list_events(
        pipeline=breaker.name
    )
    assert [(e.kind, e.task_id, e.run_id) for e in events] == [
        ("breaker_opened", "load_orders", first.run_id),
        ("breaker_half_open", "orders_api_closed", third.run_id),
        ("breaker_closed", "load_orders", third.run_id),
    ], "the sensor took the probe slot for its run; the run's task reported the outcome"
