"""
Every ``airflow selfheal`` command, run through the real ``airflow`` executable against real databases.

Each ``airflow`` start costs seconds, so independent calls run two at a time and every call checks
as much as it can. Data is written with the hooks first, under a fresh table prefix per test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.circuit_breaker import CircuitBreakerHook
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.letters import FailedRecord
from airflow_selfheal.store.types import utcnow
from tests.conftest import database_for

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
UNREACHABLE_CONN = "selfheal_test_unreachable"


@dataclass(frozen=True)
class Seeded:
    """A state store filled with a known story, and the options that point the CLI at it."""

    conn_id: str
    prefix: str
    letter_ids: dict[str, int]  # record key -> dead letter id

    def options(self) -> list[str]:
        return ["--conn-id", self.conn_id, "--table-prefix", self.prefix]


def hourly(index: int) -> Interval:
    return Interval(T0 + index * HOUR, T0 + (index + 1) * HOUR)


def seed(conn_id: str, prefix: str) -> Seeded:
    """
    Pipeline ``orders``: hours 0, 1 and 5 done, 2 failed, 3 running with a dead claim, 4 never run.
    Dead letters: ``a`` parked after a failed redrive (attempts 2), ``b`` and ``c`` pending
    (ValueError), ``d`` pending (KeyError). Pipeline ``billing``: one done hour. Breaker
    ``payments-api``: forced open.
    """
    ledger = CheckpointHook(conn_id, table_prefix=prefix)
    for index in (0, 1, 5, 2, 3):
        claim = ledger.try_claim("orders", hourly(index))
        assert claim is not None
        if index == 2:
            ledger.fail(claim, error="upstream answered 503\nfull response follows")
        elif index != 3:
            ledger.commit(claim, reason="scheduled")
    with ledger.engine.begin() as conn:  # the worker holding hour 3 died two hours ago
        table = ledger.tables.intervals
        conn.execute(
            sa.update(table)
            .where(table.c.pipeline == "orders", table.c.interval_start == hourly(3).start)
            .values(claimed_at=utcnow() - 2 * HOUR)
        )
    billing = ledger.try_claim("billing", hourly(0))
    assert billing is not None
    ledger.commit(billing, reason="scheduled")

    letters = DeadLetterHook(conn_id, table_prefix=prefix)
    records = []
    for key, error in (("a", ValueError("amount is negative")), ("b", ValueError("x")), ("c", ValueError("y"))):
        try:
            raise error
        except ValueError as raised:
            records.append(
                FailedRecord(
                    pipeline="orders",
                    payload={"key": key, "amount": -1, "when": T0},
                    error=raised,
                    stage="transform",
                    record_key=key,
                    interval=hourly(0),
                )
            )
    records.append(FailedRecord(pipeline="orders", payload={}, error=KeyError("d"), stage="read", record_key="d"))
    letters.add(records)
    [claimed] = letters.claim_for_redrive("orders", limit=1)
    assert letters.redrive_failed(claimed, RuntimeError("still negative"), max_attempts=2) == "parked"
    ids = {letter.record_key: letter.id for letter in letters.list_letters(limit=None)}

    CircuitBreakerHook(conn_id, table_prefix=prefix).force_open("payments-api", reason="vendor maintenance")
    return Seeded(conn_id, prefix, ids)


class Stores:
    """Seeded stores by database name (``sqlite``, ``postgres``, ``mysql``), made on first use."""

    def __init__(self) -> None:
        self.made: dict[str, Seeded] = {}

    def __getitem__(self, name: str) -> Seeded:
        if name not in self.made:
            db = database_for(name)
            prefix = f"c{uuid.uuid4().hex[:8]}_"
            self.made[name] = Seeded(db.conn_id, prefix, {})  # registered before seeding: dropped even if it fails
            self.made[name] = seed(db.conn_id, prefix)
        return self.made[name]


@pytest.fixture
def stores() -> Iterator[Stores]:
    made = Stores()
    yield made
    for store in made.made.values():
        SelfHealStoreHook(store.conn_id, table_prefix=store.prefix).drop_state_tables()


def selfheal(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, f"AIRFLOW_CONN_{UNREACHABLE_CONN.upper()}": "postgresql://postgres@127.0.0.1:1/test"}
    return subprocess.run(
        [AIRFLOW, "selfheal", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def run_all(*calls: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI calls two at a time (the machine has two cores); results in call order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda call: selfheal(*call), calls))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, f"{result.args}: rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_status_on_every_database(stores: Stores) -> None:
    pg, maria, lite = run_all(
        ["status", "-o", "json", *stores["postgres"].options()],
        ["status", "-o", "json", *stores["mysql"].options()],
        ["status", "--pipeline", "orders", *stores["sqlite"].options()],
    )
    for result in (pg, maria):
        report = as_json(result)
        assert isinstance(report, dict)
        assert [p["pipeline"] for p in report["pipelines"]] == ["billing", "orders"]
        orders = report["pipelines"][1]
        assert orders["watermark"] == (T0 + 2 * HOUR).isoformat(), "the watermark stops at the failed hour"
        assert orders["newest_done_end"] == (T0 + 6 * HOUR).isoformat()
        expected_lag = (utcnow() - (T0 + 6 * HOUR)).total_seconds()
        assert abs(orders["lag"] - expected_lag) < 300
        assert orders["gaps"] == 3, "failed hour 2, stale hour 3, missing hour 4"
        assert (orders["dead_letters_pending"], orders["dead_letters_parked"]) == (3, 1)
        [breaker] = report["breakers"]
        assert (breaker["name"], breaker["state"], breaker["last_error"]) == (
            "payments-api",
            "open",
            "vendor maintenance",
        )

    table = ok(lite).splitlines()
    header = [cell.strip() for cell in table[0].split("|")]
    row = dict(zip(header, (cell.strip() for cell in table[2].split("|")), strict=True))
    assert row["pipeline"] == "orders" and row["watermark"] == "2026-01-01T02:00:00Z"
    assert (row["gaps"], row["dead_letters_pending"], row["dead_letters_parked"]) == ("3", "3", "1")
    assert "billing" not in ok(lite), "--pipeline shows only that pipeline"
    assert any("payments-api" in line and "open" in line for line in table), "breakers are listed below"


def test_gaps(stores: Stores) -> None:
    store = stores["postgres"]
    found, window = run_all(
        ["gaps", "orders", "-o", "json", *store.options()],
        ["gaps", "orders", "--start", "2026-01-01T01:00:00Z", "--end", "2026-01-01T08:00:00", *store.options()],
    )
    assert [(g["start"], g["status"]) for g in as_json(found)] == [
        ((T0 + 2 * HOUR).isoformat(), "failed"),
        ((T0 + 3 * HOUR).isoformat(), "stale"),
        ((T0 + 4 * HOUR).isoformat(), "missing"),
    ]
    assert as_json(found)[0]["error"] == "upstream answered 503\nfull response follows"
    lines = ok(window).splitlines()
    assert "upstream answered 503" in lines[2] and "full response" not in window.stdout, "first line in tables"
    assert "2026-01-01T06:00:00Z | 2026-01-01T08:00:00Z | missing" in window.stdout, "a naive --end means UTC"


def test_dlq_inspection(stores: Stores) -> None:
    store = stores["postgres"]
    filters = ["--pipeline", "orders", "--status", "pending", "--error-class", "ValueError"]
    listed, table, shown = run_all(
        ["dlq", "list", *filters, "-o", "json", *store.options()],
        ["dlq", "list", "--limit", "2", *store.options()],
        ["dlq", "show", str(store.letter_ids["b"]), *store.options()],
    )
    letters = as_json(listed)
    assert isinstance(letters, list)
    assert [(x["record_key"], x["status"], x["attempts"]) for x in letters] == [
        ("b", "pending", 1),
        ("c", "pending", 1),
    ]
    assert letters[0]["interval_start"] == T0.isoformat() and letters[0]["payload_bytes"] > 0

    rows = ok(table).splitlines()
    assert len([line for line in rows if line.strip()]) == 4, "header, rule and --limit 2 rows"
    assert "parked" in rows[2] and "RuntimeError" in rows[2], "oldest first: letter a, parked after its redrive"

    detail = ok(shown)
    assert '"amount": -1' in detail and '"__type__": "datetime"' in detail, "the full payload, as stored"
    assert "Traceback (most recent call last)" in detail and "ValueError: x" in detail
    assert "status             pending" in detail


def test_dlq_actions(stores: Stores) -> None:
    store = stores["mysql"]
    ids = store.letter_ids
    parked, discarded = run_all(
        ["dlq", "park", str(ids["b"]), str(ids["c"]), "-o", "json", *store.options()],
        ["dlq", "discard", str(ids["d"]), "-o", "json", *store.options()],
    )
    assert [(x["id"], x["previous_status"], x["status"]) for x in as_json(parked)] == [
        (ids["b"], "pending", "parked"),
        (ids["c"], "pending", "parked"),
    ]
    assert as_json(discarded)[0]["status"] == "discarded"

    by_filter, by_id = run_all(
        ["dlq", "redrive", "--pipeline", "orders", "--error-class", "RuntimeError", *store.options()],
        ["dlq", "redrive", str(ids["d"]), "-o", "json", *store.options()],
    )
    assert "Re-queued 1 dead letter(s)" in ok(by_filter)
    assert [(x["id"], x["status"], x["attempts"]) for x in as_json(by_id)] == [(ids["d"], "pending", 1)]

    letters = DeadLetterHook(store.conn_id, table_prefix=store.prefix)
    statuses = {x.record_key: (x.status, x.attempts) for x in letters.list_letters(limit=None)}
    assert statuses == {
        "a": ("pending", 1),  # re-queued by filter, attempt budget reset
        "b": ("parked", 1),  # parked by ValueError, so the RuntimeError filter left it
        "c": ("parked", 1),
        "d": ("pending", 1),
    }
    assert [x.record_key for x in letters.claim_for_redrive("orders", limit=10)] == ["a", "d"], (
        "the next redrive run picks the re-queued letters up"
    )


def test_breaker_commands(stores: Stores) -> None:
    store = stores["sqlite"]
    open_options = ["--open-for", "600", "--reason", "planned downtime"]
    opened, listed = run_all(
        ["breaker", "open", "warehouse", *open_options, "-o", "json", *store.options()],
        ["breaker", "list", *store.options()],
    )
    [warehouse] = as_json(opened)
    assert (warehouse["state"], warehouse["last_error"]) == ("open", "planned downtime")
    probe_in = dt.datetime.fromisoformat(warehouse["next_probe_at"]) - dt.datetime.fromisoformat(warehouse["opened_at"])
    assert probe_in == dt.timedelta(seconds=600)
    assert "payments-api" in ok(listed) and "vendor maintenance" in listed.stdout

    [reset] = run_all(["breaker", "reset", "payments-api", "-o", "json", *store.options()])
    assert as_json(reset)[0]["state"] == "closed"
    states = {b.name: b.state for b in CircuitBreakerHook(store.conn_id, table_prefix=store.prefix).list_states()}
    assert states == {"payments-api": "closed", "warehouse": "open"}


def test_errors_are_one_line_and_exit_1(stores: Stores) -> None:
    store = stores["postgres"]
    unknown_pipeline, bad_id, unreachable, unknown_breaker = run_all(
        ["status", "--pipeline", "nope", *store.options()],
        ["dlq", "show", "999999", *store.options()],
        ["status", "--conn-id", UNREACHABLE_CONN],
        ["breaker", "reset", "nope", *store.options()],
    )
    one_line_error(unknown_pipeline, "unknown pipeline 'nope'; known pipelines: billing, orders")
    one_line_error(bad_id, "dead letter 999999 does not exist")
    one_line_error(unreachable, f"the state store (connection '{UNREACHABLE_CONN}') failed")
    one_line_error(unknown_breaker, "unknown circuit breaker 'nope'")
