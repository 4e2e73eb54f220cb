"""Idempotent writes of one interval into a destination table, finding the bad rows of a failing batch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.intervals import Interval
from airflow_selfheal.store import dialects
from airflow_selfheal.store.identifiers import validate_dotted_table, validate_identifier
from airflow_selfheal.store.types import naive_utc

WRITE_STRATEGIES = ("replace_interval", "upsert")


class RowRejected(Exception):
    """A single row the sink cannot take (unknown column, outside the interval, refused by the database)."""


@dataclass(slots=True)
class Pending:
    """A row to write and the source record it came from (what a dead letter stores)."""

    row: dict[str, Any]
    source: Any


@dataclass(frozen=True)
class SinkSpec:
    """
    Where and how an interval is written.

    :param table: destination table, ``table`` or ``schema.table``.
    :param write_strategy: ``replace_interval`` deletes the interval's rows then inserts;
        ``upsert`` inserts or updates by ``key_columns``.
    :param interval_column: a column the engine fills with the interval start; replace deletes by it.
    :param timestamp_column: alternatively, a timestamp column; replace deletes ``start <= ts < end``
        and a row whose timestamp lies outside the interval is rejected (it would survive a rerun).
    :param key_columns: primary key of the rows (required for upsert; also names dead letters).
    :param target_fields: column names for tuple records, in order.
    """

    table: str
    write_strategy: str = "replace_interval"
    interval_column: str | None = None
    timestamp_column: str | None = None
    key_columns: tuple[str, ...] = ()
    target_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_dotted_table(self.table, argument="destination_table")
        if self.write_strategy not in WRITE_STRATEGIES:
            raise ValueError(f"write_strategy={self.write_strategy!r} must be one of {', '.join(WRITE_STRATEGIES)}")
        for name in (self.interval_column, self.timestamp_column):
            if name is not None:
                validate_identifier(name, argument="interval_column/timestamp_column")
        for name in (*self.key_columns, *self.target_fields):
            validate_identifier(name, argument="key_columns/target_fields")
        if self.write_strategy == "replace_interval" and not (self.interval_column or self.timestamp_column):
            raise ValueError(
                "write_strategy='replace_interval' needs interval_column or timestamp_column to find the "
                "interval's rows on a rerun"
            )
        if self.interval_column and self.timestamp_column:
            raise ValueError("give interval_column or timestamp_column, not both")
        if self.write_strategy == "upsert" and not self.key_columns:
            raise ValueError("write_strategy='upsert' needs key_columns")


class SqlSink:
    """Writes rows of one interval inside a transaction the engine holds."""

    def __init__(self, spec: SinkSpec, *, classify_transient: Callable[[BaseException], bool]) -> None:
        self.spec = spec
        self.is_transient = classify_transient
        self._table: sa.Table | None = None
        # Per record shape (its column names in order): the naive-datetime columns among them.
        self._shapes: dict[tuple[str, ...], list[str]] = {}
        self._naive_columns: frozenset[str] | None = None
        self._last_bounds: _Bounds | None = None

    def _naive_datetime_columns(self, table: sa.Table) -> frozenset[str]:
        """Columns whose aware datetimes must be stored as naive UTC."""
        if self._naive_columns is None:
            self._naive_columns = frozenset(
                c.name
                for c in table.columns
                if isinstance(c.type, sa.DateTime) and not getattr(c.type, "timezone", False)
            )
        return self._naive_columns

    def table(self, conn: sa.Connection) -> sa.Table:
        """The destination table, reflected once."""
        if self._table is None:
            schema, name = validate_dotted_table(self.spec.table, argument="destination_table")
            self._table = sa.Table(name, sa.MetaData(schema=schema), autoload_with=conn)
        return self._table

    def _scope(self, table: sa.Table, interval: Interval) -> sa.ColumnElement[bool] | None:
        if self.spec.interval_column:
            column = table.c[self.spec.interval_column]
            return column == db_value(column, interval.start)
        if self.spec.timestamp_column:
            column = table.c[self.spec.timestamp_column]
            return sa.and_(column >= db_value(column, interval.start), column < db_value(column, interval.end))
        return None

    def current_rows(self, conn: sa.Connection, interval: Interval) -> list[dict[str, Any]]:
        """The interval's rows as they are now (for the version archive)."""
        table = self.table(conn)
        scope = self._scope(table, interval)
        if scope is None:
            return []
        return [dict(r) for r in conn.execute(sa.select(table).where(scope)).mappings()]

    def clear_interval(self, conn: sa.Connection, interval: Interval) -> int:
        """Delete the interval's rows before a replace-strategy write; returns how many went."""
        if self.spec.write_strategy != "replace_interval":
            return 0
        return self.delete_scope(conn, interval)

    def delete_scope(self, conn: sa.Connection, interval: Interval) -> int:
        """Delete every row of the interval (found by interval or timestamp column), whatever the strategy."""
        table = self.table(conn)
        scope = self._scope(table, interval)
        if scope is None:
            raise ValueError("this needs interval_column or timestamp_column to find the interval's rows")
        return int(conn.execute(sa.delete(table).where(scope)).rowcount)

    def to_row(self, record: Any, interval: Interval, table: sa.Table) -> dict[str, Any]:
        """Shape one transformed record as a row of the table, or raise :class:`RowRejected`."""
        # Runs once per record of a catch-up: the common cases come first and per-shape work is cached.
        if type(record) is dict:
            row = record.copy()
        elif isinstance(record, Mapping):
            row = dict(record)
        elif isinstance(record, tuple | list):
            fields = self.spec.target_fields or tuple(c.name for c in table.columns)
            if len(record) != len(fields):
                raise RowRejected(f"tuple of {len(record)} values for {len(fields)} target fields {list(fields)}")
            row = dict(zip(fields, record, strict=True))
        else:
            raise RowRejected(f"a record must be a dict or a tuple, got {type(record).__name__}")
        shape = tuple(row)
        naive_columns = self._shapes.get(shape)
        if naive_columns is None:
            naive_columns = self._learn_shape(shape, table)
        spec = self.spec
        if spec.interval_column:
            row[spec.interval_column] = interval.start
        if spec.timestamp_column:
            stamp = row.get(spec.timestamp_column)
            if isinstance(stamp, str):  # SQLite hands timestamps back as text
                try:
                    stamp = row[spec.timestamp_column] = dt.datetime.fromisoformat(stamp)
                except ValueError:
                    raise RowRejected(f"{spec.timestamp_column}={stamp!r} is not a timestamp") from None
            if not self._bounds(interval).contains(stamp):
                raise RowRejected(
                    f"{spec.timestamp_column}={stamp!r} is outside the interval {interval}; "
                    "a rerun would not replace it"
                )
        if spec.key_columns:
            missing_keys = [k for k in spec.key_columns if row.get(k) is None]
            if missing_keys:
                raise RowRejected(f"key columns {missing_keys} are missing")
        for name in naive_columns:
            value = row[name]
            if isinstance(value, dt.datetime) and value.tzinfo is not None:
                row[name] = naive_utc(value)
        return row

    def _learn_shape(self, shape: tuple[str, ...], table: sa.Table) -> list[str]:
        """Check a new shape of record (its column names in order) once; returns its naive-datetime columns."""
        unknown = set(shape) - set(table.c.keys())
        if unknown:
            raise RowRejected(f"columns {sorted(unknown)} do not exist in {self.spec.table}")
        naive_columns = self._shapes[shape] = [n for n in shape if n in self._naive_datetime_columns(table)]
        return naive_columns

    def _bounds(self, interval: Interval) -> _Bounds:
        if self._last_bounds is None or self._last_bounds.interval is not interval:
            self._last_bounds = _Bounds.of(interval)
        return self._last_bounds

    def write(
        self, conn: sa.Connection, batch: Sequence[Pending]
    ) -> tuple[list[Pending], list[tuple[Pending, Exception]]]:
        """
        Write ``batch``; returns (written, rejected with their errors).

        A batch the database refuses is split in halves, each in its own savepoint, until the
        single bad rows are found: good rows are never dead-lettered with a bad neighbour.
        Transient errors are raised: the whole interval attempt is retried.
        """
        if not batch:
            return [], []
        table = self.table(conn)
        # Rows with different column sets cannot share one multi-row statement.
        groups: dict[tuple[str, ...], list[Pending]] = {}
        for pending in batch:
            groups.setdefault(tuple(pending.row), []).append(pending)
        written: list[Pending] = []
        rejected: list[tuple[Pending, Exception]] = []
        for group in groups.values():
            self._write_bisect(conn, table, group, written, rejected)
        return written, rejected

    def _write_bisect(
        self,
        conn: sa.Connection,
        table: sa.Table,
        batch: list[Pending],
        written: list[Pending],
        rejected: list[tuple[Pending, Exception]],
    ) -> None:
        savepoint = conn.begin_nested()
        try:
            self._write_rows(conn, table, [p.row for p in batch])
            savepoint.commit()
            written.extend(batch)
            return
        except sa.exc.DBAPIError as error:
            savepoint.rollback()
            if self.is_transient(error):
                raise
            if len(batch) == 1:
                rejected.append((batch[0], error))
                return
        middle = len(batch) // 2
        self._write_bisect(conn, table, batch[:middle], written, rejected)
        self._write_bisect(conn, table, batch[middle:], written, rejected)

    def _write_rows(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        if self.spec.write_strategy == "upsert":
            dialects.bulk_upsert(
                conn, table, _last_per_key(rows, self.spec.key_columns), key_columns=self.spec.key_columns
            )
        else:
            dialects.bulk_insert(conn, table, rows)


def _last_per_key(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One statement may not update a row twice: keep the last row of each key (later data wins)."""
    by_key = {tuple(r[k] for k in keys): r for r in rows}
    return list(by_key.values())


def db_value(column: sa.Column[Any], value: Any) -> Any:
    """Aware datetimes become naive UTC for columns without a time zone (what every dialect stores there)."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None and not getattr(column.type, "timezone", False):
        return naive_utc(value)
    return value


@dataclass(frozen=True, slots=True)
class _Bounds:
    """An interval's bounds, aware and as naive UTC, so a timestamp of either kind compares without conversion."""

    interval: Interval
    naive_start: dt.datetime
    naive_end: dt.datetime

    @classmethod
    def of(cls, interval: Interval) -> _Bounds:
        return cls(interval, naive_utc(interval.start), naive_utc(interval.end))

    def contains(self, stamp: Any) -> bool:
        """``start <= stamp < end``; a naive timestamp is read as UTC, anything but a datetime is outside."""
        if not isinstance(stamp, dt.datetime):
            return False
        if stamp.tzinfo is None:
            return self.naive_start <= stamp < self.naive_end
        return self.interval.start <= stamp < self.interval.end
