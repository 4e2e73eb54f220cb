"""
The state store's tables, defined once with SQLAlchemy Core for every dialect.

Table names are ``<prefix><name>`` in an optional schema. Bump :data:`SCHEMA_VERSION` and add a
migration step in :mod:`airflow_selfheal.hooks.state_store` whenever a table changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import sqlalchemy as sa

from airflow_selfheal.store.identifiers import validate_identifier
from airflow_selfheal.store.types import UtcDateTime, long_text

SCHEMA_VERSION = 1
COMPONENT = "airflow_selfheal"

# Ledger statuses (the checkpoint state machine; see docs/architecture.md).
RUNNING, DONE, FAILED = "running", "done", "failed"
# Dead-letter statuses.
PENDING, REDRIVING, RESOLVED, PARKED, DISCARDED = "pending", "redriving", "resolved", "parked", "discarded"
# Breaker states.
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

_KEY = sa.String(200)  # pipeline and breaker names: bounded so they can be indexed on MySQL


@dataclass(frozen=True)
class StateTables:
    """The bound set of state tables for one prefix and schema."""

    metadata: sa.MetaData
    schema_version: sa.Table
    intervals: sa.Table
    interval_versions: sa.Table
    archived_rows: sa.Table
    dead_letters: sa.Table
    circuit_breakers: sa.Table
    heal_events: sa.Table


@cache
def state_tables(prefix: str = "selfheal_", schema: str | None = None) -> StateTables:
    """
    Build (once per prefix and schema) the table definitions.

    :param prefix: table name prefix; a plain identifier (may be empty).
    :param schema: database schema, or ``None`` for the connection's default.
    """
    validate_identifier(prefix, argument="table_prefix", allow_empty=True, max_length=30)
    if schema is not None:
        validate_identifier(schema, argument="schema")
    md = sa.MetaData(schema=schema)
    p = prefix

    schema_version = sa.Table(
        f"{p}schema_version",
        md,
        sa.Column("component", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("applied_at", UtcDateTime, nullable=False),
    )

    def interval_key() -> list[sa.Column[object]]:
        return [
            sa.Column("pipeline", _KEY, primary_key=True),
            sa.Column("interval_start", UtcDateTime, primary_key=True),
            sa.Column("interval_end", UtcDateTime, primary_key=True),
        ]

    intervals = sa.Table(
        f"{p}intervals",
        md,
        *interval_key(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, default=0),
        sa.Column("rows_read", sa.BigInteger),
        sa.Column("rows_written", sa.BigInteger),
        sa.Column("rows_dead_lettered", sa.BigInteger),
        sa.Column("checksum", sa.String(64)),
        sa.Column("reason", sa.String(32)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("try_number", sa.Integer),
        sa.Column("claim_token", sa.String(36)),
        sa.Column("claimed_at", UtcDateTime),
        sa.Column("committed_at", UtcDateTime),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("error", sa.Text),
        sa.Index(f"ix_{p}intervals_status", "pipeline", "status"),
    )

    interval_versions = sa.Table(
        f"{p}interval_versions",
        md,
        *interval_key(),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("rows_read", sa.BigInteger),
        sa.Column("rows_written", sa.BigInteger),
        sa.Column("rows_dead_lettered", sa.BigInteger),
        sa.Column("checksum", sa.String(64)),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("run_id", sa.String(250)),
        sa.Column("try_number", sa.Integer),
        sa.Column("committed_at", UtcDateTime, nullable=False),
    )

    # Destination rows that a version replaced, kept for rollback (``keep_versions``).
    archived_rows = sa.Table(
        f"{p}archived_rows",
        md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("pipeline", _KEY, nullable=False),
        sa.Column("interval_start", UtcDateTime, nullable=False),
        sa.Column("interval_end", UtcDateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("row_json", long_text(), nullable=False),
        sa.Index(f"ix_{p}archived_rows_interval", "pipeline", "interval_start", "interval_end", "version"),
    )

    dead_letters = sa.Table(
        f"{p}dead_letters",
        md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("pipeline", _KEY, nullable=False),
        sa.Column("record_identity", sa.String(80), nullable=False),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("task_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("interval_start", UtcDateTime),
        sa.Column("interval_end", UtcDateTime),
        sa.Column("record_key", sa.Text),
        sa.Column("payload", long_text(), nullable=False),
        sa.Column("payload_bytes", sa.BigInteger, nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("payload_truncated", sa.Boolean, nullable=False, default=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("error_class", sa.String(250), nullable=False),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", long_text()),
        sa.Column("attempts", sa.Integer, nullable=False, default=1),
        sa.Column("first_seen", UtcDateTime, nullable=False),
        sa.Column("last_seen", UtcDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claim_token", sa.String(36)),
        sa.Column("claimed_at", UtcDateTime),
        sa.Column("resolved_at", UtcDateTime),
        sa.UniqueConstraint("pipeline", "record_identity", name=f"uq_{p}dead_letters_record"),
        sa.Index(f"ix_{p}dead_letters_status", "pipeline", "status"),
    )

    circuit_breakers = sa.Table(
        f"{p}circuit_breakers",
        md,
        sa.Column("name", _KEY, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
        sa.Column("window_calls", sa.Integer, nullable=False, default=0),
        sa.Column("window_failures", sa.Integer, nullable=False, default=0),
        sa.Column("window_started_at", UtcDateTime),
        # The sliding window itself (JSON: a count window's outcomes or a time window's buckets);
        # window_calls/window_failures are its totals at the last update, for people and the CLI.
        sa.Column("window_data", sa.Text),
        sa.Column("opened_at", UtcDateTime),
        sa.Column("next_probe_at", UtcDateTime),
        sa.Column("open_count", sa.Integer, nullable=False, default=0),
        sa.Column("probes_in_flight", sa.Integer, nullable=False, default=0),
        # Who holds the half-open probe slots, and since when (JSON list of [owner, ISO time]).
        sa.Column("probe_leases", sa.Text),
        sa.Column("last_error", sa.Text),
        sa.Column("revision", sa.Integer, nullable=False, default=0),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )

    heal_events = sa.Table(
        f"{p}heal_events",
        md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("occurred_at", UtcDateTime, nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("pipeline", _KEY),
        sa.Column("interval_start", UtcDateTime),
        sa.Column("interval_end", UtcDateTime),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("task_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("detail", long_text()),
        sa.Index(f"ix_{p}heal_events_kind", "kind", "occurred_at"),
    )

    return StateTables(
        metadata=md,
        schema_version=schema_version,
        intervals=intervals,
        interval_versions=interval_versions,
        archived_rows=archived_rows,
        dead_letters=dead_letters,
        circuit_breakers=circuit_breakers,
        heal_events=heal_events,
    )
