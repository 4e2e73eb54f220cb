"""CircuitBreakerTrigger.run() against a real state store: it fires when the breaker may be called again."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import pytest
from airflow.sdk.module_loading import import_string

from airflow_selfheal.healing.breaker_state import BreakerPolicy, Outcome
from airflow_selfheal.hooks.circuit_breaker import CircuitBreakerHook
from airflow_selfheal.triggers.circuit_breaker import CircuitBreakerTrigger
from tests.conftest import Database


def make_trigger(database: Database, prefix: str, name: str, **kwargs: float) -> CircuitBreakerTrigger:
    return CircuitBreakerTrigger(
        breaker_name=name,
        selfheal_conn_id=database.conn_id,
        table_prefix=prefix,
        **kwargs,  # type: ignore[arg-type]
    )


async def first_event(trigger: CircuitBreakerTrigger) -> dict:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def test_fires_when_the_cooldown_ends_not_at_the_next_poll(database: Database, table_prefix: str) -> None:
    name = f"api_{uuid.uuid4().hex[:6]}"
    CircuitBreakerHook(database.conn_id, table_prefix=table_prefix).force_open(name, dt.timedelta(seconds=1))
    trigger = make_trigger(database, table_prefix, name, poll_interval=30)
    started = time.monotonic()
    event = asyncio.run(asyncio.wait_for(first_event(trigger), timeout=20))
    waited = time.monotonic() - started
    assert event == {"status": "ready", "breaker": name, "state": "open"}, "open with the probe due"
    assert 0.5 < waited < 10, f"woke after {waited:.1f}s: at the probe time, not after the 30 s poll interval"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_waits_while_the_probe_slots_are_taken_and_fires_on_close(database: Database, table_prefix: str) -> None:
    name = f"api_{uuid.uuid4().hex[:6]}"
    hook = CircuitBreakerHook(database.conn_id, table_prefix=table_prefix)
    policy = BreakerPolicy(failure_threshold=1, open_for=dt.timedelta(milliseconds=1))
    hook.force_open(name, dt.timedelta(milliseconds=1))
    time.sleep(0.01)
    assert hook.admit(name, policy, ("run:probe",)).admission.probe  # type: ignore[union-attr]
    trigger = make_trigger(database, table_prefix, name, poll_interval=0.1)

    async def scenario() -> tuple[dict, float]:
        waiting = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(0.6)
        assert not waiting.done(), "the only probe slot is taken: keep waiting"
        closed_at = time.monotonic()
        await asyncio.to_thread(hook.record, name, policy, Outcome.SUCCESS, ("run:probe",))
        event = await asyncio.wait_for(waiting, timeout=10)
        return event, time.monotonic() - closed_at

    event, latency = asyncio.run(scenario())
    assert event["state"] == "closed" and latency < 5


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_serializes_to_names_and_rebuilds(database: Database, table_prefix: str) -> None:
    trigger = make_trigger(database, table_prefix, "orders_api", poll_interval=7, half_open_max_probes=2)
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert all(isinstance(v, str | int | float | type(None)) for v in kwargs.values()), "plain values only"


def test_an_unreachable_store_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SELFHEAL_DOWN", "postgresql://postgres@127.0.0.1:9/test?connect_timeout=2")
    trigger = CircuitBreakerTrigger(
        breaker_name="api", selfheal_conn_id="selfheal_down", table_prefix="selfheal_", poll_interval=0.1
    )
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(first_event(trigger), timeout=1.0))
