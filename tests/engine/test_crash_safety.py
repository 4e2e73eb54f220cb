"""
A worker SIGKILLed at each step boundary of the write, then the interval rerun (the next Airflow try):
the destination must equal one clean run, with no duplicates, whatever the strategy and whether the
destination shares the state store's database or not.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import sqlalchemy as sa

from airflow_selfheal.engine.models import RunContext
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.intervals import Interval
from tests.conftest import database_for
from tests.engine.helpers import create_destination, destination_rows, drop_table, hourly, make_engine, records_for

STEPS = ("before_write", "mid_write", "after_write_before_checkpoint", "after_checkpoint")
# (state store, destination): the same database, and each kind of database paired with another.
PAIRS = [
    ("sqlite", "sqlite"),
    ("postgres", "postgres"),
    ("mysql", "mysql"),
    ("sqlite", "postgres"),
    ("postgres", "mysql"),
    ("mysql", "sqlite"),
]
ROWS = 40


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crashing_run(step: str, **engine_args: Any) -> None:
    """Runs in a forked child: process the interval and die at ``step``."""

    def produce(interval: Interval) -> Any:
        if step == "before_write":
            _die()
        yield from records_for(interval, ROWS)

    def transform(record: dict[str, Any]) -> dict[str, Any]:
        if step == "mid_write" and record["amount"] == 25:  # two chunks of 10 are already written
            _die()
        return record

    engine = make_engine(produce=produce, transform=transform, chunk_size=10, **engine_args)
    if step == "after_write_before_checkpoint":
        prefix = engine_args["prefix"]

        @sa.event.listens_for(engine.ledger.engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            if (
                statement.lstrip().upper().startswith("UPDATE")
                and f"{prefix}intervals" in statement
                and ("done" in str(parameters))
            ):
                _die()

    engine.run(hourly(1)[0], RunContext(reason="scheduled", run_id="scheduled__1", try_number=1))
    if step == "after_checkpoint":
        _die()


@pytest.mark.parametrize("strategy", ["replace_interval", "upsert"])
@pytest.mark.parametrize(("store_name", "dest_name"), PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_a_killed_write_reruns_to_exactly_one_clean_result(store_name: str, dest_name: str, strategy: str) -> None:
    store, dest = database_for(store_name), database_for(dest_name)
    interval = hourly(1)[0]
    expected = [(r["id"], r["amount"], r["note"]) for r in records_for(interval, ROWS)]
    for step in STEPS:
        prefix = f"crash{os.getpid() % 1000}{STEPS.index(step)}{strategy[0]}_"
        table = create_destination(dest.conn_id)
        engine_args = {
            "store_conn_id": store.conn_id,
            "prefix": prefix,
            "dest_conn_id": dest.conn_id,
            "table": table,
            "strategy": strategy,
        }
        try:
            pid = os.fork()
            if pid == 0:  # the worker that will be killed
                try:
                    _crashing_run(step, **engine_args)
                finally:
                    os._exit(3)  # only reached if the crash point was never hit
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{step}: no crash"

            # Airflow's next try of the same run reprocesses the interval.
            rerun = make_engine(produce=lambda interval: records_for(interval, ROWS), chunk_size=10, **engine_args)
            summary = rerun.run(interval, RunContext(reason="retry", run_id="scheduled__1", try_number=2))
            assert destination_rows(dest.conn_id, table) == expected, f"{step}: destination differs from a clean run"
            entry = CheckpointHook(store.conn_id, table_prefix=prefix).get("orders", interval)
            assert entry is not None and entry.status == "done"
            assert summary.version == (2 if step == "after_checkpoint" else 1), step
        finally:
            drop_table(dest.conn_id, table)
            from airflow_selfheal.hooks.state_store import SelfHealStoreHook

            SelfHealStoreHook(store.conn_id, table_prefix=prefix).drop_state_tables()
