"""CircuitBreakerSensor: passes, skips, fails or defers (holding no worker slot) per the breaker's state."""

from __future__ import annotations

import datetime as dt
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException, TaskDeferred

from airflow_selfheal.breaker import CircuitBreaker
from airflow_selfheal.exceptions import CircuitOpenError, TransientError
from airflow_selfheal.sensors.circuit_breaker import CircuitBreakerSensor
from airflow_selfheal.triggers.circuit_breaker import CircuitBreakerTrigger
from tests.airflow_harness import AirflowDb
from tests.conftest import Database

pytestmark = pytest.mark.parametrize("database", ["sqlite"], indirect=True)
T0 = dt.datetime(2026, 6, 1, 8, tzinfo=dt.UTC)


def run_context(run_id: str, task_id: str = "gate") -> dict[str, Any]:
    ti = SimpleNamespace(dag_id="orders", task_id=task_id, run_id=run_id, map_index=-1, try_number=1)
    return {"ti": ti, "run_id": run_id}


@pytest.fixture
def clock() -> list[dt.datetime]:
    return [T0]


@pytest.fixture
def breaker(database: Database, table_prefix: str, clock: list[dt.datetime]) -> CircuitBreaker:
    return CircuitBreaker(
        f"api_{uuid.uuid4().hex[:6]}",
        failure_threshold=1,
        open_for=dt.timedelta(minutes=10),
        selfheal_conn_id=database.conn_id,
        table_prefix=table_prefix,
        clock=lambda: clock[0],
    )


def test_passes_while_closed(breaker: CircuitBreaker) -> None:
    assert CircuitBreakerSensor(task_id="gate", breaker=breaker).execute(run_context("r1")) is None


def test_defers_while_open_and_one_run_becomes_the_probe(breaker: CircuitBreaker, clock: list[dt.datetime]) -> None:
    breaker.force_open(dt.timedelta(minutes=10))
    sensor = CircuitBreakerSensor(task_id="gate", breaker=breaker, poke_interval=5, timeout=3600)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(run_context("r1"))
    trigger = deferred.value.trigger
    assert isinstance(trigger, CircuitBreakerTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert dt.timedelta(seconds=3590) < deferred.value.timeout <= dt.timedelta(seconds=3600)  # type: ignore[operator]
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_selfheal.triggers.circuit_breaker.CircuitBreakerTrigger"
    assert kwargs["breaker_name"] == breaker.name and kwargs["poll_interval"] == 5
    assert kwargs["selfheal_conn_id"] == breaker.hook.selfheal_conn_id, "the trigger carries names, not the object"

    clock[0] += dt.timedelta(minutes=10)
    assert sensor.execute_complete(run_context("r1"), {"status": "ready"}, **deferred.value.kwargs) is None
    with pytest.raises(TaskDeferred):  # another DAG run waits while r1 holds the only probe slot
        sensor.execute(run_context("r2"))
    assert sensor.execute(run_context("r1", task_id="gate_again")) is None, "r1's tasks are part of the probe"

    breaker.on_success(run_context("r1", task_id="load"))  # r1's downstream task reports for the probe
    assert breaker.state().state == "closed"  # type: ignore[union-attr]
    assert sensor.execute(run_context("r2")) is None


def test_skip_and_fail_modes(breaker: CircuitBreaker) -> None:
    breaker.force_open(None, reason="vendor maintenance")
    with pytest.raises(AirflowSkipException):
        CircuitBreakerSensor(task_id="gate", breaker=breaker, when_open="skip").execute(run_context("r1"))
    with pytest.raises(CircuitOpenError, match="is open"):
        CircuitBreakerSensor(task_id="gate", breaker=breaker, when_open="fail").execute(run_context("r1"))
    poking = CircuitBreakerSensor(task_id="gate", breaker=breaker, deferrable=False)
    assert poking.poke(run_context("r1")) is False
    with pytest.raises(ValueError, match="when_open"):
        CircuitBreakerSensor(task_id="gate", breaker=breaker, when_open="never")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="breaker"):
        CircuitBreakerSensor(task_id="gate", breaker="orders_api")  # type: ignore[arg-type]


def test_dag_test_waits_in_a_trigger_then_probes(airflow_db: AirflowDb, database: Database, table_prefix: str) -> None:
    """dag.test() runs triggers in line: the sensor defers, the trigger fires at the probe time, the run closes it."""
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG

    breaker = CircuitBreaker(
        f"feed_{uuid.uuid4().hex[:6]}",
        failure_threshold=1,
        open_for=dt.timedelta(seconds=2),
        selfheal_conn_id=database.conn_id,
        table_prefix=table_prefix,
    )

    def feed_is_down() -> None:
        raise TransientError("feed answered 503")

    with DAG(f"breaker_wait_{uuid.uuid4().hex[:6]}", schedule=None, start_date=T0, catchup=False) as dag:
        trip = PythonOperator(task_id="trip", python_callable=feed_is_down, on_failure_callback=breaker.on_failure)
        # Runs after the breaker opened, so it must wait: the only way it waits is by deferring.
        gate = CircuitBreakerSensor(task_id="feed_closed", breaker=breaker, poke_interval=0.2, trigger_rule="all_done")
        load = PythonOperator(task_id="load", python_callable=lambda: None, on_success_callback=breaker.on_success)
        trip >> gate >> load

    run = airflow_db.run_dag(dag, logical_date=T0)
    assert run.state == "success"
    events = breaker.hook.events.list_events(pipeline=breaker.name)
    assert [(e.kind, e.task_id) for e in events] == [
        ("breaker_opened", "trip"),
        ("breaker_half_open", "feed_closed"),
        ("breaker_closed", "load"),
    ]
    waited = events[1].occurred_at - events[0].occurred_at
    assert waited >= dt.timedelta(seconds=2), "the gate held until the probe time"
