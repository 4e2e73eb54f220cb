"""The only place that knows SQL dialects apart: engine tuning and insert-or-update statements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

UpdateBuilder = Callable[[Any], Mapping[str, Any]]
"""Given the "incoming row" column collection, return the SET clause of the update."""


def tune_engine(engine: sa.Engine) -> sa.Engine:
    """
    Make SQLite behave like a server database under concurrent processes.

    pysqlite begins transactions lazily and upgrades read locks to write locks, which deadlocks
    instantly between processes; ``BEGIN IMMEDIATE`` takes the write lock up front and waits on
    ``busy_timeout`` instead. WAL lets readers run beside the writer.
    """
    if engine.dialect.name != "sqlite":
        return engine

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 60000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upsert(
    connection: sa.Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key_columns: Sequence[str],
    update: UpdateBuilder,
) -> None:
    """
    Insert ``rows``; where a row with the same ``key_columns`` exists, apply ``update`` instead.

    ``update`` receives the incoming-row columns (``excluded`` / ``inserted``) and returns the SET
    clause; inside it, ``table.c.x`` refers to the existing row.
    """
    if not rows:
        return
    name = connection.dialect.name
    if name == "postgresql":
        pg_stmt = postgresql.insert(table)
        connection.execute(
            pg_stmt.on_conflict_do_update(index_elements=list(key_columns), set_=dict(update(pg_stmt.excluded))),
            list(rows),
        )
    elif name == "sqlite":
        lite_stmt = sqlite.insert(table)
        connection.execute(
            lite_stmt.on_conflict_do_update(index_elements=list(key_columns), set_=dict(update(lite_stmt.excluded))),
            list(rows),
        )
    elif name in ("mysql", "mariadb"):
        my_stmt = mysql.insert(table)
        connection.execute(my_stmt.on_duplicate_key_update(dict(update(my_stmt.inserted))), list(rows))
    else:
        raise NotImplementedError(f"upsert is not implemented for the {name!r} dialect")


def supports_schemas(dialect_name: str) -> bool:
    """Whether a separate schema (PostgreSQL) or database (MySQL) can hold the state tables."""
    return dialect_name in ("postgresql", "mysql", "mariadb")
