"""
Circuit breakers under a real Airflow (api-server, scheduler with LocalExecutor, dag-processor, triggerer).

The dependency is a local HTTP server (:mod:`tests.upstream_server`) that the tests switch between up,
down (503) and stopped, and that counts the requests it receives. Breaker state lives in PostgreSQL.

- An upstream outage opens a breaker shared by two DAGs; while it is open neither calls the upstream
  (their tasks are skipped and the intervals stay missing in the ledger); after the cooldown one probe
  closes it, and a batched catch-up fills the skipped and failed intervals.
- ``CircuitBreakerSensor`` waits in the real triggerer (task instance ``deferred``, no worker slot)
  and resumes when the breaker is reset from the CLI or when its cooldown lets a probe through.
- ``pause_dags``: opening the breaker pauses another DAG through the REST API, closing unpauses it.
"""

from __future__ import annotations

import datetime as dt
import string
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from airflow_selfheal.breaker import CircuitBreaker
from airflow_selfheal.engine.sources import sql_engine
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from tests.airflow_harness import AirflowServer, AirflowServerError
from tests.conftest import database_for
from tests.upstream_server import UpstreamServer, records_for, serve

CONN = "selfheal_test_postgres"
T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
# Long enough for three refused runs to be scheduled, started and skipped on a loaded 2-core machine.
ORDERS_OPEN_FOR = 25
WAREHOUSE_OPEN_FOR = 3

# Shared by the DAG files: a past end_date keeps the scheduler from creating runs of its own, so
# every run below is one the test triggered (an @hourly DAG would get an automatic run at once).
HEADER = """
from __future__ import annotations

import datetime as dt

import httpx
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, DeltaDataIntervalTimetable, task

from airflow_selfheal.breaker import CircuitBreaker
from airflow_selfheal.healing.retry import RetrySettings
from airflow_selfheal.sensors.circuit_breaker import CircuitBreakerSensor

UPSTREAM = "$url"
T0 = dt.datetime.fromisoformat("$t0")
HOURLY = dict(
    schedule=DeltaDataIntervalTimetable(dt.timedelta(hours=1)),
    start_date=T0,
    end_date=T0 + dt.timedelta(hours=12),
    catchup=False,
)
STORE = dict(selfheal_conn_id="$conn", table_prefix="$prefix")
SINK = dict(
    destination_conn_id="$conn",
    destination_table="$dest",
    timestamp_column="ts",
    key_columns=("id",),
    pipeline="orders",
    retry=RetrySettings(max_attempts=1),  # one request per interval: the test counts them
    retries=0,
    **STORE,
)


def get(path, start=T0, end=T0 + dt.timedelta(hours=1)):
    response = httpx.get(f"{UPSTREAM}{path}", params={"start": start.isoformat(), "end": end.isoformat()}, timeout=10)
    response.raise_for_status()
    return response.json()
"""

# The orders team's DAG: an interval pipeline guarded inside the task, plus its batched catch-up.
ORDERS_DAG = """
ORDERS_API = CircuitBreaker(
    "$breaker", failure_threshold=3, open_for=dt.timedelta(seconds=$open_for), when_open="skip", **STORE
)


def fetch_orders(interval):
    for record in get("/orders", interval.start, interval.end):
        yield {**record, "ts": dt.datetime.fromisoformat(record["ts"])}


with DAG("$orders_dag", **HOURLY):

    @task.selfheal(task_id="load", circuit_breaker=ORDERS_API, **SINK)
    def load(interval):
        yield from fetch_orders(interval)

    load()

with DAG("$catch_up_dag", **HOURLY):

    @task.selfheal(task_id="catch_up", catch_up=True, **SINK)
    def catch_up(interval):
        yield from fetch_orders(interval)

    catch_up()
"""

# Another team's DAG on the same dependency: the same breaker (by name), used as a gate and through
# task callbacks composed with the team's own alert callback.
CUSTOMERS_DAG = """
ORDERS_API = CircuitBreaker(
    "$breaker", failure_threshold=3, open_for=dt.timedelta(seconds=$open_for), when_open="skip", **STORE
)


def alert_team(context):
    httpx.get(f"{UPSTREAM}/alerts", timeout=5)  # the team's own alert hook, kept next to the breaker's


with DAG("$customers_dag", schedule=None, start_date=T0):
    gate = CircuitBreakerSensor(task_id="orders_api_closed", breaker=ORDERS_API)
    sync = PythonOperator(
        task_id="sync_customers",
        python_callable=lambda: len(get("/customers")),
        on_failure_callback=[alert_team, ORDERS_API.on_failure],
        on_success_callback=ORDERS_API.on_success,
        retries=0,
    )
    gate >> sync
"""

# A vendor feed behind a deferrable gate.
GATE_DAG = """
VENDOR_FEED = CircuitBreaker("$vendor_breaker", failure_threshold=1, when_open="wait", **STORE)

with DAG("$gate_dag", schedule=None, start_date=T0):
    gate = CircuitBreakerSensor(task_id="vendor_feed_closed", breaker=VENDOR_FEED, poke_interval=1, timeout=150)
    pull = PythonOperator(
        task_id="pull_feed",
        python_callable=lambda: len(get("/feed")),
        on_failure_callback=VENDOR_FEED.on_failure,
        on_success_callback=VENDOR_FEED.on_success,
        retries=0,
    )
    gate >> pull
"""

# A warehouse outage pauses the reporting DAG that reads from the warehouse.
PAUSE_DAGS = """
WAREHOUSE = CircuitBreaker(
    "$warehouse_breaker",
    failure_threshold=1,
    open_for=dt.timedelta(seconds=$warehouse_open_for),
    pause_dags=["$reports_dag"],
    airflow_api_conn_id="$api_conn_id",
    **STORE,
)

with DAG("$loader_dag", schedule=None, start_date=T0):
    PythonOperator(
        task_id="load_warehouse",
        python_callable=lambda: len(get("/warehouse")),
        on_failure_callback=WAREHOUSE.on_failure,
        on_success_callback=WAREHOUSE.on_success,
        retries=0,
    )

with DAG("$reports_dag", schedule=None, start_date=T0):
    EmptyOperator(task_id="build_reports")
"""


@dataclass(frozen=True)
class Stack:
    """The module's DAGs, breakers and tables on the shared Airflow server."""

    server: AirflowServer
    upstream: UpstreamServer
    prefix: str
    dest: str
    names: dict[str, str]

    def breaker(self, key: str, **kwargs: Any) -> CircuitBreaker:
        """The test process's handle on a breaker the DAGs use (same name, same store)."""
        return CircuitBreaker(self.names[key], selfheal_conn_id=CONN, table_prefix=self.prefix, **kwargs)

    def events(self, key: str) -> list[str]:
        """Heal event kinds of a breaker, oldest first."""
        hook = HealEventHook(CONN, table_prefix=self.prefix)
        return [e.kind for e in hook.list_events(pipeline=self.names[key])]


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    yield from serve("up")


@pytest.fixture(scope="module")
def stack(airflow_server: AirflowServer, airflow_api_conn_id: str, upstream: UpstreamServer) -> Iterator[Stack]:
    """Write every DAG of this module at once: one ``dags reserialize`` (several seconds) instead of four."""
    database_for("postgres")
    sfx = uuid.uuid4().hex[:8]
    names = {
        "breaker": f"orders_api_{sfx}",
        "vendor_breaker": f"vendor_feed_{sfx}",
        "warehouse_breaker": f"warehouse_{sfx}",
        "orders_dag": f"brk_orders_{sfx}",
        "catch_up_dag": f"brk_orders_catch_up_{sfx}",
        "customers_dag": f"brk_customers_{sfx}",
        "gate_dag": f"brk_gate_{sfx}",
        "loader_dag": f"brk_loader_{sfx}",
        "reports_dag": f"brk_reports_{sfx}",
    }
    prefix, dest = f"brk{sfx}_", f"brk_orders_{sfx}"
    table = sa.Table(
        dest,
        sa.MetaData(),
        sa.Column("id", sa.Integer),  # no key on purpose: a duplicate would show
        sa.Column("ts", sa.DateTime),
        sa.Column("amount", sa.Integer),
    )
    table.create(sql_engine(CONN))
    store = SelfHealStoreHook(CONN, table_prefix=prefix)
    store.tables  # noqa: B018  # create the state tables now, not in three tasks racing to do it
    values = {
        **names,
        "url": upstream.url,
        "t0": T0.isoformat(),
        "conn": CONN,
        "prefix": prefix,
        "dest": dest,
        "open_for": ORDERS_OPEN_FOR,
        "warehouse_open_for": WAREHOUSE_OPEN_FOR,
        "api_conn_id": airflow_api_conn_id,
    }
    files = {
        f"brk_orders_{sfx}.py": ORDERS_DAG,
        f"brk_customers_{sfx}.py": CUSTOMERS_DAG,
        f"brk_gate_{sfx}.py": GATE_DAG,
        f"brk_pause_{sfx}.py": PAUSE_DAGS,
    }
    try:
        write_dags(
            airflow_server, {name: string.Template(HEADER + body).substitute(values) for name, body in files.items()}
        )
        yield Stack(airflow_server, upstream, prefix, dest, names)
    finally:
        table.drop(sql_engine(CONN))
        store.drop_state_tables()


def write_dags(server: AirflowServer, files: dict[str, str]) -> None:
    """Write several DAG files, reserialize once, and fail on any import error among them."""
    for name, source in files.items():
        (server.dags_folder / name).write_text(source)
    server.cli("dags", "reserialize")
    errors = server.api("GET", "/importErrors", params={"limit": 100}).get("import_errors", [])
    mine = [e for e in errors if str(e.get("filename", "")).rsplit("/", 1)[-1] in files]
    if mine:
        raise AirflowServerError("\n\n".join(f"{e['filename']}:\n{e.get('stack_trace')}" for e in mine))


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def hour(k: int) -> Interval:
    return Interval(T0 + k * HOUR, T0 + (k + 1) * HOUR)


def trigger_interval(server: AirflowServer, dag_id: str, k: int) -> str:
    return server.trigger(dag_id, logical_date=hour(k).start, data_interval=(hour(k).start, hour(k).end))


def finish(server: AirflowServer, dag_id: str, run_id: str) -> dict[str, str]:
    """Wait for the run; return ``{task_id: state}``."""
    server.wait_for_run(dag_id, run_id, timeout=120)
    return {t["task_id"]: t["state"] for t in server.task_instances(dag_id, run_id)}


def is_paused(server: AirflowServer, dag_id: str) -> bool:
    return bool(server.api("GET", f"/dags/{dag_id}")["is_paused"])


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.airflow_server
def test_shared_breaker_opens_on_outage_skips_without_calling_then_probe_closes_and_catch_up_fills(
    stack: Stack,
) -> None:
    server, upstream, names = stack.server, stack.upstream, stack.names
    orders, customers, catch_up = names["orders_dag"], names["customers_dag"], names["catch_up_dag"]
    breaker = stack.breaker("breaker")
    ledger = CheckpointHook(CONN, table_prefix=stack.prefix)
    started = time.monotonic()

    # 1. The upstream is down: two orders intervals and one customers run fail; the third failure opens.
    upstream.down()
    failing = [(orders, trigger_interval(server, orders, 0)), (orders, trigger_interval(server, orders, 1))]
    failing.append((customers, server.trigger(customers)))
    states = [finish(server, dag_id, run_id) for dag_id, run_id in failing]
    assert states == [
        {"load": "failed"},
        {"load": "failed"},
        {"orders_api_closed": "success", "sync_customers": "failed"},
    ]
    opened = breaker.state()
    assert opened is not None and opened.state == "open", opened
    assert opened.open_count == 1 and "503" in (opened.last_error or "")
    probe_due = opened.next_probe_at
    assert probe_due is not None
    assert dict(upstream.calls) == {"/orders": 2, "/customers": 1, "/alerts": 1}, "user callback composes"
    assert {e.interval: e.status for e in ledger.entries("orders")} == {hour(0): "failed", hour(1): "failed"}
    phase_1 = time.monotonic()

    # 2. Open: both DAGs skip their work and the upstream receives nothing.
    calls_when_opened = dict(upstream.calls)
    refused = [(orders, trigger_interval(server, orders, 2)), (orders, trigger_interval(server, orders, 3))]
    refused.append((customers, server.trigger(customers)))
    states = [finish(server, dag_id, run_id) for dag_id, run_id in refused]
    assert states == [
        {"load": "skipped"},
        {"load": "skipped"},
        {"orders_api_closed": "skipped", "sync_customers": "skipped"},
    ]
    assert dict(upstream.calls) == calls_when_opened, "an open breaker must keep every task away from the upstream"
    for dag_id, run_id in refused:  # the refusals really happened inside the cooldown
        for ti in server.task_instances(dag_id, run_id):
            if ti["start_date"]:
                assert parse_time(ti["start_date"]) < probe_due, f"open_for too short here: {ti}"
    assert hour(2) not in {e.interval for e in ledger.entries("orders")}, "a skipped interval stays missing"
    assert breaker.state().state == "open"  # type: ignore[union-attr]
    phase_2 = time.monotonic()

    # 3. The upstream is back; after the cooldown the next guarded run is the one probe and closes it.
    upstream.up()
    wait_until(lambda: dt.datetime.now(dt.UTC) > probe_due, "the cooldown", timeout=ORDERS_OPEN_FOR + 5)
    assert finish(server, orders, trigger_interval(server, orders, 4)) == {"load": "success"}
    closed = breaker.state()
    assert closed is not None and closed.state == "closed", closed
    assert upstream.calls["/orders"] == calls_when_opened["/orders"] + 1, "exactly one probe call"
    assert stack.events("breaker") == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    phase_3 = time.monotonic()

    # 4. Catch-up fills the failed and skipped intervals; the customers DAG sees the breaker closed too.
    runs = [
        (catch_up, trigger_interval(server, catch_up, 5)),
        (orders, trigger_interval(server, orders, 5)),
        (customers, server.trigger(customers)),
    ]
    states = [finish(server, dag_id, run_id) for dag_id, run_id in runs]
    assert states == [
        {"catch_up": "success"},
        {"load": "success"},
        {"orders_api_closed": "success", "sync_customers": "success"},
    ]
    entries = {e.interval: e for e in ledger.entries("orders")}
    assert {iv: (e.status, e.reason) for iv, e in entries.items()} == {
        **{hour(k): ("done", "catch-up") for k in range(4)},
        hour(4): ("done", "manual"),
        hour(5): ("done", "manual"),
    }
    assert ledger.watermark("orders", origin=T0) == hour(5).end
    expected = sorted((r["id"], r["amount"]) for r in records_for(T0, hour(5).end))
    with sql_engine(CONN).connect() as conn:
        written = sorted(tuple(r) for r in conn.exec_driver_sql(f"SELECT id, amount FROM {stack.dest}"))
    assert written == expected, "every interval exactly once"
    # 2 failed + 1 probe + 4 caught up + 1 real-time; nothing while open.
    assert dict(upstream.calls) == {"/orders": 8, "/customers": 2, "/alerts": 1}
    assert stack.events("breaker") == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    print(
        f"\nbreaker e2e: failing {phase_1 - started:.1f}s, open {phase_2 - phase_1:.1f}s, "
        f"probe {phase_3 - phase_2:.1f}s, catch-up {time.monotonic() - phase_3:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
    )


def wait_deferred(server: AirflowServer, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    """Wait until the task instance is deferred and a triggerer has taken its trigger."""

    def deferred() -> dict[str, Any] | None:
        ti = server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        if ti["state"] in ("success", "failed", "skipped", "upstream_failed"):
            raise AssertionError(f"{task_id} ended {ti['state']} instead of deferring")
        return ti if ti["state"] == "deferred" and ti["triggerer_job"] else None

    return wait_until(deferred, f"{task_id} to be deferred in the triggerer", timeout=90)


@pytest.mark.airflow_server
def test_sensor_waits_in_the_triggerer_until_reset_or_cooldown(stack: Stack) -> None:
    server, upstream = stack.server, stack.upstream
    dag_id, gate = stack.names["gate_dag"], "vendor_feed_closed"
    breaker = stack.breaker("vendor_breaker")
    upstream.up()
    started = time.monotonic()

    # Held open until someone resets it: the sensor waits in the triggerer, holding no worker slot.
    breaker.force_open(reason="vendor maintenance")
    run_id = server.trigger(dag_id)
    ti = wait_deferred(server, dag_id, run_id, gate)
    assert ti["trigger"]["classpath"] == "airflow_selfheal.triggers.circuit_breaker.CircuitBreakerTrigger"
    pool = server.api("GET", "/pools/default_pool")
    assert pool["running_slots"] == 0 and pool["deferred_slots"] >= 1, pool
    time.sleep(3)  # the trigger polls every second; an open breaker must not wake it
    assert server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{gate}")["state"] == "deferred"
    assert upstream.calls["/feed"] == 0

    server.cli(
        "selfheal", "breaker", "reset", stack.names["vendor_breaker"], "--conn-id", CONN, "--table-prefix", stack.prefix
    )
    reset_at = time.monotonic()
    assert finish(server, dag_id, run_id) == {gate: "success", "pull_feed": "success"}
    resumed_in = time.monotonic() - reset_at
    sensor = server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{gate}")
    assert sensor["try_number"] == 1, "resumed from deferral, not retried"
    assert upstream.calls["/feed"] == 1

    # Open for a few seconds: the trigger fires when the probe is due, the run becomes the probe,
    # and the feed task's success callback closes the breaker.
    breaker.force_open(dt.timedelta(seconds=6), reason="vendor rate limit")
    run_id = server.trigger(dag_id)
    wait_deferred(server, dag_id, run_id, gate)
    assert finish(server, dag_id, run_id) == {gate: "success", "pull_feed": "success"}
    snapshot = breaker.state()
    assert snapshot is not None and snapshot.state == "closed", snapshot
    assert stack.events("vendor_breaker") == [
        "breaker_forced_open",
        "breaker_reset",
        "breaker_forced_open",
        "breaker_half_open",
        "breaker_closed",
    ]
    assert upstream.calls["/feed"] == 2
    print(f"\nsensor e2e: {time.monotonic() - started:.1f}s; resumed {resumed_in:.1f}s after the CLI reset")


@pytest.mark.airflow_server
def test_opening_pauses_other_dags_through_the_rest_api_and_closing_unpauses_them(stack: Stack) -> None:
    server, upstream = stack.server, stack.upstream
    loader, reports = stack.names["loader_dag"], stack.names["reports_dag"]
    breaker = stack.breaker("warehouse_breaker")
    started = time.monotonic()
    assert not is_paused(server, reports)

    upstream.stop()  # connection refused: a transient error, counted
    try:
        assert finish(server, loader, server.trigger(loader)) == {"load_warehouse": "failed"}
    finally:
        upstream.up()
    opened = breaker.state()
    assert opened is not None and opened.state == "open" and "ConnectError" in (opened.last_error or ""), opened
    wait_until(lambda: is_paused(server, reports), f"{reports} to be paused by the breaker", timeout=30)
    assert not is_paused(server, loader), "only the listed DAGs are paused"

    probe_due = opened.next_probe_at
    assert probe_due is not None
    wait_until(lambda: dt.datetime.now(dt.UTC) > probe_due, "the cooldown", timeout=WAREHOUSE_OPEN_FOR + 5)
    assert finish(server, loader, server.trigger(loader)) == {"load_warehouse": "success"}
    closed = breaker.state()
    assert closed is not None and closed.state == "closed", closed
    wait_until(lambda: not is_paused(server, reports), f"{reports} to be unpaused by the breaker", timeout=30)
    assert stack.events("warehouse_breaker") == ["breaker_opened", "breaker_closed"]
    print(f"\npause_dags e2e: {time.monotonic() - started:.1f}s")
