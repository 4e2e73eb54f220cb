"""The only place that knows SQL dialects apart: engine tuning and insert-or-update statements."""

from __future__ import annotations

import operator
import uuid
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


def bulk_insert(connection: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """
    Insert many rows fast: COPY on PostgreSQL (psycopg 3), multi-row INSERTs elsewhere.

    Every row must have the same keys. Errors surface as the driver raised them, so callers can
    split a failing batch to find the bad rows.
    """
    if not rows:
        return
    if _copy_capable(connection):
        driver: Any = connection.connection.driver_connection
        columns = list(rows[0].keys())
        column_list = ", ".join(connection.dialect.identifier_preparer.quote(c) for c in columns)
        target = connection.dialect.identifier_preparer.format_table(table)
        statement = f"COPY {target} ({column_list}) FROM STDIN"
        dbapi_error = connection.dialect.loaded_dbapi.Error
        values_of = operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
        try:
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(values_of(row))
        except dbapi_error as error:
            # Surface driver errors the way SQLAlchemy would, so callers handle one error family.
            raise sa.exc.DBAPIError.instance(statement, None, error, dbapi_error, dialect=connection.dialect) from error
        return
    # SQLAlchemy batches executemany INSERTs into multi-row VALUES ("insertmanyvalues").
    connection.execute(sa.insert(table), list(rows))


def bulk_upsert(
    connection: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *, key_columns: Sequence[str]
) -> None:
    """Insert-or-update many rows by ``key_columns``; every other column takes the incoming value."""
    if not rows:
        return
    if _copy_capable(connection):
        _staged_upsert(connection, table, rows, key_columns=key_columns)
        return
    columns = [c for c in rows[0] if c not in key_columns]

    def update(new: Any) -> dict[str, Any]:
        if not columns:  # key-only table: keep the row as it is
            return {key_columns[0]: table.c[key_columns[0]]}
        return {c: new[c] for c in columns}

    upsert(connection, table, rows, key_columns=key_columns, update=update)


def _copy_capable(connection: sa.Connection) -> bool:
    return connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg"


def _staged_upsert(
    connection: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *, key_columns: Sequence[str]
) -> None:
    """PostgreSQL: COPY into a temporary staging table, then one INSERT ... SELECT ... ON CONFLICT."""
    columns = list(rows[0].keys())
    stage_name = f"selfheal_stage_{uuid.uuid4().hex[:12]}"
    target = connection.dialect.identifier_preparer.format_table(table)
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {stage_name} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DROP")
    stage = sa.Table(stage_name, sa.MetaData(), *[sa.Column(c, table.c[c].type) for c in columns])
    bulk_insert(connection, stage, rows)
    statement = postgresql.insert(table).from_select(columns, sa.select(*[stage.c[c] for c in columns]))
    updates = {c: statement.excluded[c] for c in columns if c not in key_columns}
    if updates:
        connection.execute(statement.on_conflict_do_update(index_elements=list(key_columns), set_=updates))
    else:
        connection.execute(statement.on_conflict_do_nothing(index_elements=list(key_columns)))
    connection.exec_driver_sql(f"DROP TABLE {stage_name}")
