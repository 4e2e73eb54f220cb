"""Where an interval's records come from: a SQL query or a user's Python function."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from typing import Any, Protocol

import sqlalchemy as sa
from airflow.providers.common.sql.hooks.sql import DbApiHook
from airflow.sdk import BaseHook

from airflow_selfheal.exceptions import SelfHealError
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.types import naive_utc

Record = Mapping[str, Any] | tuple[Any, ...]


class RecordSource(Protocol):
    """Yields an interval's records in chunks, so memory stays bounded by the chunk size."""

    def chunks(self, interval: Interval, chunk_size: int) -> Iterator[list[Record]]:
        """Yield lists of at most ``chunk_size`` records; called again from scratch on a retry."""
        ...


def sql_engine(conn_id: str) -> sa.Engine:
    """A SQLAlchemy engine on any common-sql connection (connection handling stays common-sql's)."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not isinstance(hook, DbApiHook):
        raise SelfHealError(f"connection {conn_id!r} has a {type(hook).__name__}, not a SQL hook")
    return hook.get_sqlalchemy_engine()


class SqlSource:
    """
    Streams the rows of a SQL query with a server-side cursor where the driver has one.

    :param conn_id: source connection.
    :param render_sql: returns the query for one interval (templated by the operator).
    :param parameters: bind parameters; ``interval_start`` and ``interval_end`` are always added,
        so ``WHERE ts >= :interval_start AND ts < :interval_end`` works on every dialect.
    """

    def __init__(
        self,
        *,
        conn_id: str,
        render_sql: Callable[[Interval], str],
        parameters: Mapping[str, Any] | None = None,
        engine: sa.Engine | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.render_sql = render_sql
        self.parameters = dict(parameters or {})
        self._engine = engine

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = sql_engine(self.conn_id)
        return self._engine

    def chunks(self, interval: Interval, chunk_size: int) -> Generator[list[Record], None, None]:
        params = {**self.parameters, **bind_bounds(self.engine, interval)}
        with self.engine.connect() as conn:
            # yield_per fetches chunk_size rows per round trip from the start (stream_results alone starts at 1).
            result = conn.execution_options(yield_per=chunk_size).execute(sa.text(self.render_sql(interval)), params)
            keys = list(result.keys())
            for partition in result.partitions(chunk_size):
                yield [dict(zip(keys, row, strict=True)) for row in partition]


def bind_bounds(engine: sa.Engine, interval: Interval) -> dict[str, Any]:
    """Interval bounds as bind parameters in the form the dialect compares correctly with stored timestamps."""
    if engine.dialect.name in ("sqlite", "mysql", "mariadb"):
        # These keep naive timestamps; compare like with like (UTC).
        return {
            "interval_start": naive_utc(interval.start),
            "interval_end": naive_utc(interval.end),
        }
    return {"interval_start": interval.start, "interval_end": interval.end}


class CallableSource:
    """
    Records from a user's function that receives the interval and returns or yields records.

    :param function: called as ``function(interval=..., **kwargs)``; returns an iterable of dicts or tuples.
    """

    def __init__(self, function: Callable[..., Iterable[Record] | None], **kwargs: Any) -> None:
        self.function = function
        self.kwargs = kwargs

    def chunks(self, interval: Interval, chunk_size: int) -> Iterator[list[Record]]:
        records = self.function(interval=interval, **self.kwargs)
        if records is None:
            return
        iterator = iter(records)
        while chunk := list(itertools.islice(iterator, chunk_size)):
            yield chunk
