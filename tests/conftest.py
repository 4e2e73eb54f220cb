"""Shared fixtures: real SQLite, PostgreSQL and MariaDB behind Airflow connections, and an isolated AIRFLOW_HOME."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.airflow_harness"]

# Airflow reads its environment at import time: isolate it before anything imports airflow.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="selfheal-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_DIR / 'airflow' / 'airflow.db'}"
(_SESSION_DIR / "airflow").mkdir(parents=True, exist_ok=True)

POSTGRES_URL = os.environ.get("SELFHEAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("SELFHEAL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
SQLITE_PATH = _SESSION_DIR / "selfheal-state.db"

CONN_IDS = {"sqlite": "selfheal_test_sqlite", "postgres": "selfheal_test_postgres", "mysql": "selfheal_test_mysql"}
_CONN_VALUES = {
    "sqlite": f'{{"conn_type": "sqlite", "host": "{SQLITE_PATH}"}}',
    "postgres": POSTGRES_URL,
    "mysql": MYSQL_URL,
}
for _name, _conn_id in CONN_IDS.items():
    os.environ[f"AIRFLOW_CONN_{_conn_id.upper()}"] = _CONN_VALUES[_name]

DATABASES = ("sqlite", "postgres", "mysql")
SERVER_DATABASES = ("postgres", "mysql")


@dataclass(frozen=True)
class Database:
    """A real database reachable through an Airflow connection."""

    name: str
    conn_id: str


def _unavailable(name: str, error: Exception) -> None:
    # Every machine of this project runs both servers: a missing database is a failure, never a skip.
    pytest.fail(f"{name} is not reachable ({error}); start it or set SELFHEAL_TEST_{name.upper()}_URL")


_REACHABLE: dict[str, Exception | None] = {}


def database_for(name: str) -> Database:
    """Return the named database, failing (CI) or skipping (locally) when it is down."""
    if name not in _REACHABLE:
        from airflow_selfheal.hooks.state_store import SelfHealStoreHook

        try:
            hook = SelfHealStoreHook(CONN_IDS[name])
            with hook.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            _REACHABLE[name] = None
        except Exception as exc:
            _REACHABLE[name] = exc
    error = _REACHABLE[name]
    if error is not None:
        _unavailable(name, error)
    return Database(name, CONN_IDS[name])


@pytest.fixture(params=DATABASES)
def database(request: pytest.FixtureRequest) -> Database:
    """Each test using this runs once on SQLite, PostgreSQL and MariaDB."""
    return database_for(request.param)


@pytest.fixture(params=SERVER_DATABASES)
def server_database(request: pytest.FixtureRequest) -> Database:
    """PostgreSQL and MariaDB only (multi-process concurrency tests)."""
    return database_for(request.param)


@pytest.fixture
def table_prefix(database: Database) -> Iterator[str]:
    """A unique table prefix for one test; its state tables are dropped afterwards."""
    yield from _prefix_for(database)


@pytest.fixture
def server_table_prefix(server_database: Database) -> Iterator[str]:
    yield from _prefix_for(server_database)


def _prefix_for(db: Database) -> Iterator[str]:
    from airflow_selfheal.hooks.state_store import SelfHealStoreHook

    prefix = f"t{uuid.uuid4().hex[:8]}_"
    yield prefix
    SelfHealStoreHook(db.conn_id, table_prefix=prefix).drop_state_tables()


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR
