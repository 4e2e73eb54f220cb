"""Base hook of the state store: one SQL connection, the state tables, and their creation."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from airflow.providers.common.sql.hooks.sql import DbApiHook
from airflow.sdk import BaseHook

from airflow_selfheal import config
from airflow_selfheal.exceptions import SelfHealError
from airflow_selfheal.store import dialects
from airflow_selfheal.store.identifiers import validate_identifier
from airflow_selfheal.store.schema import COMPONENT, SCHEMA_VERSION, StateTables, state_tables
from airflow_selfheal.store.types import utcnow

log = logging.getLogger(__name__)

_ENGINES: dict[tuple[int, str, str], sa.Engine] = {}
_READY: set[tuple[int, str, str, str | None]] = set()
_LOCK = threading.Lock()


class SelfHealStoreHook(BaseHook):
    """
    Gives the state store's hooks a SQL connection and the state tables, created on first use.

    Any connection whose hook is a common-sql ``DbApiHook`` works (SQLite, PostgreSQL, MySQL/MariaDB).
    Engines are shared per process and connection, so many hooks cost one pool.

    :param selfheal_conn_id: Airflow connection of the state store (default ``[selfheal] conn_id``,
        itself defaulting to ``selfheal_default``).
    :param table_prefix: prefix of every state table (default ``[selfheal] table_prefix``, ``selfheal_``).
    :param schema: schema (PostgreSQL) or database (MySQL) of the state tables; ``None`` is the
        connection's default. SQLite has none.
    """

    conn_name_attr = "selfheal_conn_id"
    default_conn_name = config.DEFAULT_CONN_ID
    hook_name = "Self-heal state store"

    def __init__(
        self,
        selfheal_conn_id: str | None = None,
        *,
        table_prefix: str | None = None,
        schema: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.selfheal_conn_id = selfheal_conn_id or config.default_conn_id()
        self.table_prefix = validate_identifier(
            config.default_table_prefix() if table_prefix is None else table_prefix,
            argument="table_prefix",
            allow_empty=True,
            max_length=30,
        )
        resolved_schema = config.default_schema() if schema is None else (schema or None)
        self.schema = None if resolved_schema is None else validate_identifier(resolved_schema, argument="schema")

    @cached_property
    def db_hook(self) -> DbApiHook:
        """The common-sql hook of the connection (connection handling is common-sql's job)."""
        hook = self.get_connection(self.selfheal_conn_id).get_hook()
        if not isinstance(hook, DbApiHook):
            raise SelfHealError(
                f"connection {self.selfheal_conn_id!r} has a {type(hook).__name__}, not a SQL hook; "
                "point selfheal_conn_id at a SQLite, PostgreSQL or MySQL connection"
            )
        return hook

    @cached_property
    def engine(self) -> sa.Engine:
        """A SQLAlchemy engine on the connection, shared by every hook of this process."""
        url = self.db_hook.get_uri()
        key = (os.getpid(), self.selfheal_conn_id, url)
        with _LOCK:
            engine = _ENGINES.get(key)
            if engine is None:
                engine = dialects.tune_engine(self.db_hook.get_sqlalchemy_engine(engine_kwargs={"pool_pre_ping": True}))
                _ENGINES[key] = engine
        return engine

    @property
    def dialect(self) -> str:
        """Name of the SQL dialect behind the connection (``sqlite``, ``postgresql``, ``mysql``)."""
        return self.engine.dialect.name

    @cached_property
    def tables(self) -> StateTables:
        """The state tables, created (once per process) if they do not exist yet."""
        tables = state_tables(self.table_prefix, self.schema)
        key = (os.getpid(), str(self.engine.url), self.table_prefix, self.schema)
        if key not in _READY:
            self._ensure_schema(tables)
            _READY.add(key)
        return tables

    @contextlib.contextmanager
    def begin(self, connection: sa.Connection | None = None) -> Iterator[sa.Connection]:
        """
        Yield a connection inside a transaction.

        With ``connection`` given, the caller owns the transaction: nothing is committed here, so the
        caller's data and our state commit (or roll back) together.
        """
        if connection is not None:
            yield connection
            return
        with self.engine.begin() as conn:
            yield conn

    def _ensure_schema(self, tables: StateTables) -> None:
        if self.schema is not None and not dialects.supports_schemas(self.dialect):
            raise SelfHealError(f"schema={self.schema!r} is not supported on {self.dialect}; leave it empty")
        # An unreachable database is not a creation race: let that error out as it is.
        with self.engine.connect() as probe:
            probe.exec_driver_sql("SELECT 1")
        # Several workers may start at once: CREATE races surface as errors, after which the
        # tables exist, so retry a few times with jitter before giving up.
        attempts = 5
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.begin() as conn:
                    if self.schema is not None:
                        conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
                    tables.metadata.create_all(conn, checkfirst=True)
                break
            except sa.exc.DBAPIError:
                if attempt == attempts:
                    raise
                log.info("State tables were being created concurrently (attempt %s); retrying", attempt)
                time.sleep(random.uniform(0.05, 0.3))
        self._record_schema_version(tables)

    def _record_schema_version(self, tables: StateTables) -> None:
        table = tables.schema_version
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(table.c.version).where(table.c.component == COMPONENT)).scalar()
            if found is None:
                dialects.upsert(
                    conn,
                    table,
                    [{"component": COMPONENT, "version": SCHEMA_VERSION, "applied_at": utcnow()}],
                    key_columns=["component"],
                    update=lambda new: {"component": table.c.component},
                )
            elif found > SCHEMA_VERSION:
                raise SelfHealError(
                    f"the state tables (prefix {self.table_prefix!r}) are at schema version {found}, newer than "
                    f"this airflow-selfheal understands ({SCHEMA_VERSION}); upgrade the package"
                )
            elif found < SCHEMA_VERSION:  # pragma: no cover - no migrations exist yet
                raise SelfHealError(f"no migration from schema version {found} to {SCHEMA_VERSION}")

    def drop_state_tables(self) -> None:
        """Drop every state table of this prefix and schema (tests and uninstall)."""
        tables = state_tables(self.table_prefix, self.schema)
        with self.engine.begin() as conn:
            tables.metadata.drop_all(conn, checkfirst=True)
        _READY.discard((os.getpid(), str(self.engine.url), self.table_prefix, self.schema))
        self.__dict__.pop("tables", None)
