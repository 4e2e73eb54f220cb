"""Table prefix and schema settings, identifier safety, and concurrent table creation."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
import sqlalchemy as sa

from airflow_selfheal.exceptions import InvalidIdentifierError, SelfHealError
from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.schema import SCHEMA_VERSION
from tests.conftest import database_for
from tests.hooks.test_checkpoint import hourly


def table_names(hook: SelfHealStoreHook, schema: str | None = None) -> set[str]:
    with hook.engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names(schema=schema))


def test_the_table_prefix_is_honoured(database, table_prefix) -> None:
    hook = CheckpointHook(database.conn_id, table_prefix=table_prefix)
    claim = hook.try_claim("p", hourly(1)[0])
    assert claim is not None
    mine = {t for t in table_names(hook) if t.startswith(table_prefix)}
    assert mine == {
        f"{table_prefix}{name}"
        for name in (
            "schema_version",
            "intervals",
            "interval_versions",
            "archived_rows",
            "dead_letters",
            "circuit_breakers",
            "heal_events",
        )
    }
    with hook.engine.connect() as conn:
        version = conn.exec_driver_sql(f"SELECT version FROM {table_prefix}schema_version").scalar()
    assert version == SCHEMA_VERSION
    other = CheckpointHook(database.conn_id, table_prefix=table_prefix + "b_")
    try:
        assert other.get("p", hourly(1)[0]) is None, "another prefix is another, empty, ledger"
    finally:
        other.drop_state_tables()


def test_a_schema_holds_the_tables_on_postgres_and_mariadb(server_database) -> None:
    schema = f"selfheal_s_{uuid.uuid4().hex[:8]}"
    hook = CheckpointHook(server_database.conn_id, table_prefix="st_", schema=schema)
    try:
        claim = hook.try_claim("p", hourly(1)[0])
        assert claim is not None
        hook.commit(claim, reason="scheduled")
        assert "st_intervals" in table_names(hook, schema)
        assert "st_intervals" not in table_names(hook), "nothing lands in the default schema"
        assert hook.watermark("p") == hourly(1)[0].end
    finally:
        hook.drop_state_tables()
        with hook.engine.begin() as conn:
            drop = "DROP SCHEMA {} CASCADE" if server_database.name == "postgres" else "DROP DATABASE {}"
            conn.exec_driver_sql(drop.format(schema))


def test_sqlite_refuses_a_schema_with_a_clear_error() -> None:
    sqlite = database_for("sqlite")
    with pytest.raises(SelfHealError, match="schema='elsewhere' is not supported on sqlite"):
        _ = CheckpointHook(sqlite.conn_id, table_prefix="nowhere_", schema="elsewhere").tables


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("table_prefix", {"table_prefix": "x; DROP TABLE y"}),
        ("schema", {"schema": "x; DROP TABLE y"}),
        ("table_prefix", {"table_prefix": "a-b"}),
        ("schema", {"schema": 'public"--'}),
    ],
)
def test_identifiers_carrying_sql_are_rejected_naming_the_argument(argument: str, kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidIdentifierError, match=rf"^{argument}="):
        CheckpointHook("selfheal_test_sqlite", **kwargs)


def _create_tables(conn_id: str, prefix: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    hook = CheckpointHook(conn_id, table_prefix=prefix)
    claim = hook.try_claim("p", Interval(hourly(1)[0].start, hourly(1)[0].end))
    del claim


def test_tables_are_created_safely_when_workers_start_at_once(server_database, server_table_prefix) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    workers = [
        ctx.Process(target=_create_tables, args=(server_database.conn_id, server_table_prefix, barrier))
        for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0] * 8
    hook = CheckpointHook(server_database.conn_id, table_prefix=server_table_prefix)
    with hook.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT count(*) FROM {server_table_prefix}schema_version").scalar()
    assert rows == 1
