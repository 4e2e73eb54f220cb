"""The classifier on real errors from SQLite, PostgreSQL and MariaDB: through SQLAlchemy and from raw drivers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mysql.connector
import MySQLdb
import psycopg
import psycopg2
import pymysql
import pytest
import sqlalchemy as sa

from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER, PERMANENT, TRANSIENT, ErrorClassifier
from airflow_selfheal.hooks.state_store import SelfHealStoreHook
from tests.conftest import Database, database_for

PG: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "test"}
MY: dict[str, Any] = {"host": "127.0.0.1", "port": 3306, "user": "root", "database": "test"}


def caught(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("expected an exception")


@dataclass
class Scratch:
    """A private engine (session settings never leak into the shared pool) and a table with rows 1 and 2."""

    engine: sa.Engine
    table: str
    dialect: str


def _scratch(database: Database) -> Iterator[Scratch]:
    shared = SelfHealStoreHook(database.conn_id).engine
    engine = sa.create_engine(shared.url)
    table = f"selfheal_cls_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(50) UNIQUE)")
        conn.exec_driver_sql(f"INSERT INTO {table} (id, name) VALUES (1, 'one'), (2, 'two')")
    try:
        yield Scratch(engine, table, engine.dialect.name)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        engine.dispose()


@pytest.fixture
def scratch(database: Database) -> Iterator[Scratch]:
    """On SQLite, PostgreSQL and MariaDB."""
    yield from _scratch(database)


@pytest.fixture
def server_scratch(server_database: Database) -> Iterator[Scratch]:
    """On PostgreSQL and MariaDB."""
    yield from _scratch(server_database)


@pytest.fixture
def sqlite_scratch() -> Iterator[Scratch]:
    yield from _scratch(database_for("sqlite"))


@pytest.fixture
def postgres_scratch() -> Iterator[Scratch]:
    yield from _scratch(database_for("postgres"))


def run(engine: sa.Engine, sql: str) -> Callable[[], object]:
    def action() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)

    return action


# --- errors in SQL: permanent on every database ---------------------------------------------------------------------


def test_missing_table_is_permanent(scratch: Scratch) -> None:
    error = caught(run(scratch.engine, "SELECT * FROM selfheal_no_such_table_xyz"))
    assert isinstance(error, sa.exc.DBAPIError)
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    expected = {"sqlite": "'no such'", "postgresql": "SQLSTATE 42P01", "mysql": "error 1146"}[scratch.dialect]
    assert expected in DEFAULT_CLASSIFIER.explain(error)


def test_missing_column_is_permanent(scratch: Scratch) -> None:
    # MySQLdb raises 1054 as an OperationalError: the error number must beat the DB-API family.
    error = caught(run(scratch.engine, f"SELECT no_such_column FROM {scratch.table}"))
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    insert = caught(run(scratch.engine, f"INSERT INTO {scratch.table} (id, no_such_column) VALUES (3, 'x')"))
    assert DEFAULT_CLASSIFIER.classify(insert) == PERMANENT


def test_syntax_error_is_permanent(scratch: Scratch) -> None:
    error = caught(run(scratch.engine, "SELEC 1"))
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT


def test_unique_violation_is_permanent(scratch: Scratch) -> None:
    error = caught(run(scratch.engine, f"INSERT INTO {scratch.table} (id, name) VALUES (3, 'one')"))
    assert isinstance(error, sa.exc.IntegrityError)
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT


# --- contention: transient ------------------------------------------------------------------------------------------


def test_sqlite_database_is_locked_is_transient(sqlite_scratch: Scratch) -> None:
    scratch = sqlite_scratch
    with scratch.engine.connect() as holder, scratch.engine.connect() as waiter:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        waiter.exec_driver_sql("PRAGMA busy_timeout = 0")
        error = caught(lambda: waiter.exec_driver_sql(f"INSERT INTO {scratch.table} (id, name) VALUES (9, 'x')"))
        holder.rollback()
    assert "database is locked" in str(error)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT


def _lock_wait_timeout(s: Scratch) -> BaseException:
    with s.engine.connect() as holder, s.engine.connect() as waiter:
        holder.exec_driver_sql(f"SELECT id FROM {s.table} WHERE id = 1 FOR UPDATE")
        if s.dialect == "postgresql":
            waiter.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        else:
            waiter.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 0")
        error = caught(lambda: waiter.exec_driver_sql(f"UPDATE {s.table} SET name = 'uno' WHERE id = 1"))
        waiter.rollback()
        holder.rollback()
    return error


def test_lock_wait_timeout_is_transient(server_scratch: Scratch) -> None:
    error = _lock_wait_timeout(server_scratch)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT
    expected = {"postgresql": "SQLSTATE 55P03", "mysql": "error 1205"}[server_scratch.dialect]
    assert expected in DEFAULT_CLASSIFIER.explain(error)


def _wait_until_blocked(s: Scratch, session_id: int) -> None:
    if s.dialect == "postgresql":
        sql = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {session_id} AND wait_event_type = 'Lock'"
    else:
        sql = (
            "SELECT count(*) FROM information_schema.INNODB_TRX "
            f"WHERE trx_mysql_thread_id = {session_id} AND trx_state = 'LOCK WAIT'"
        )
    deadline = time.monotonic() + 10
    with s.engine.connect() as observer:
        while not observer.exec_driver_sql(sql).scalar() and time.monotonic() < deadline:
            observer.rollback()
            time.sleep(0.01)


def test_real_deadlock_is_transient(server_scratch: Scratch) -> None:
    s = server_scratch
    errors: list[BaseException] = []
    with s.engine.connect() as first, s.engine.connect() as second:
        session_sql = "SELECT pg_backend_pid()" if s.dialect == "postgresql" else "SELECT CONNECTION_ID()"
        first_session = int(first.exec_driver_sql(session_sql).scalar_one())
        first.exec_driver_sql(f"UPDATE {s.table} SET name = 'a1' WHERE id = 1")
        second.exec_driver_sql(f"UPDATE {s.table} SET name = 'b2' WHERE id = 2")
        if s.dialect == "postgresql":
            second.exec_driver_sql("SET LOCAL deadlock_timeout = '20ms'")  # the second session detects it

        def first_takes_row_two() -> None:
            try:
                first.exec_driver_sql(f"UPDATE {s.table} SET name = 'a2' WHERE id = 2")
            except Exception as error:
                errors.append(error)

        thread = threading.Thread(target=first_takes_row_two)
        thread.start()
        _wait_until_blocked(s, first_session)
        try:
            second.exec_driver_sql(f"UPDATE {s.table} SET name = 'b1' WHERE id = 1")
        except Exception as error:
            errors.append(error)
        second.rollback()
        thread.join(10)
        first.rollback()
    assert len(errors) == 1, errors
    assert DEFAULT_CLASSIFIER.classify(errors[0]) == TRANSIENT
    expected = {"postgresql": "SQLSTATE 40P01", "mysql": "error 1213"}[s.dialect]
    assert expected in DEFAULT_CLASSIFIER.explain(errors[0])


def test_postgres_statement_timeout_is_transient(postgres_scratch: Scratch) -> None:
    with postgres_scratch.engine.connect() as conn:
        conn.exec_driver_sql("SET LOCAL statement_timeout = '20ms'")
        error = caught(lambda: conn.exec_driver_sql("SELECT pg_sleep(2)"))
        conn.rollback()
    assert "SQLSTATE 57014" in DEFAULT_CLASSIFIER.explain(error)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT


def test_postgres_killed_connection_is_transient(postgres_scratch: Scratch) -> None:
    with postgres_scratch.engine.connect() as victim, postgres_scratch.engine.connect() as admin:
        pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        victim.rollback()
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        admin.commit()
        time.sleep(0.05)
        error = caught(lambda: victim.exec_driver_sql("SELECT 1"))
    assert isinstance(error, sa.exc.DBAPIError)
    assert error.connection_invalidated
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT


# --- connecting ---------------------------------------------------------------------------------------------------


def test_refused_connections_through_every_driver(closed_port: int) -> None:
    errors = {
        "psycopg": caught(lambda: psycopg.connect(**{**PG, "port": closed_port}, connect_timeout=2)),
        "psycopg2": caught(lambda: psycopg2.connect(**{**PG, "port": closed_port}, connect_timeout=2)),
        "MySQLdb": caught(lambda: MySQLdb.connect(**{**MY, "port": closed_port}, connect_timeout=2)),
        "pymysql": caught(lambda: pymysql.connect(**{**MY, "port": closed_port}, connect_timeout=2)),
        "mysql.connector": caught(lambda: mysql.connector.connect(**{**MY, "port": closed_port})),
        "sqlalchemy": caught(
            lambda: sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/test").connect()
        ),
    }
    verdicts = {driver: DEFAULT_CLASSIFIER.classify(error) for driver, error in errors.items()}
    assert verdicts == dict.fromkeys(errors, TRANSIENT)


def test_bad_credentials_and_databases_are_permanent() -> None:
    errors = {
        "psycopg role": caught(lambda: psycopg.connect(**{**PG, "user": "selfheal_nobody"})),
        "psycopg2 database": caught(lambda: psycopg2.connect(**{**PG, "dbname": "selfheal_no_db"})),
        "MySQLdb user": caught(lambda: MySQLdb.connect(**{**MY, "user": "selfheal_nobody"})),
        "MySQLdb database": caught(lambda: MySQLdb.connect(**{**MY, "database": "selfheal_no_db"})),
        "mysql.connector user": caught(lambda: mysql.connector.connect(**{**MY, "user": "selfheal_nobody"})),
    }
    verdicts = {what: DEFAULT_CLASSIFIER.classify(error) for what, error in errors.items()}
    assert verdicts == dict.fromkeys(errors, PERMANENT)


def test_raw_driver_codes() -> None:
    def psycopg2_missing_table() -> None:
        with psycopg2.connect(**PG) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT * FROM selfheal_no_such_table_xyz")

    def pymysql_missing_table() -> None:
        with pymysql.connect(**MY) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT * FROM selfheal_no_such_table_xyz")

    def connector_missing_table() -> None:
        conn = mysql.connector.connect(**MY)
        try:
            conn.cursor().execute("SELECT * FROM selfheal_no_such_table_xyz")
        finally:
            conn.close()

    assert "SQLSTATE 42P01" in DEFAULT_CLASSIFIER.explain(caught(psycopg2_missing_table))  # pgcode
    assert "error 1146" in DEFAULT_CLASSIFIER.explain(caught(pymysql_missing_table))  # args[0]
    # mysql-connector also has a .sqlstate ('42S02'): it must be read as MySQL, not PostgreSQL.
    assert "error 1146" in DEFAULT_CLASSIFIER.explain(caught(connector_missing_table))  # errno


def test_user_rule_matches_the_driver_error_inside_sqlalchemy(scratch: Scratch) -> None:
    error = caught(run(scratch.engine, "SELECT * FROM selfheal_no_such_table_xyz"))
    driver_class = type(error.orig)  # type: ignore[attr-defined]
    classifier = ErrorClassifier(transient=[f"{driver_class.__module__}.{driver_class.__qualname__}"])
    assert classifier.classify(error) == TRANSIENT
    assert "via wrapped" in classifier.explain(error)
