"""Provider settings: the ``[selfheal]`` Airflow config section, with defaults that work untouched."""

from __future__ import annotations

DEFAULT_CONN_ID = "selfheal_default"
DEFAULT_TABLE_PREFIX = "selfheal_"


def _get(key: str, fallback: str) -> str:
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - Airflow is a hard dependency; be defensive for tooling
        return fallback
    value = conf.get("selfheal", key, fallback=fallback)
    return fallback if value is None else str(value)


def default_conn_id() -> str:
    """Connection id of the state store (``[selfheal] conn_id``, env ``AIRFLOW__SELFHEAL__CONN_ID``)."""
    return _get("conn_id", DEFAULT_CONN_ID)


def default_table_prefix() -> str:
    """Prefix of every state table (``[selfheal] table_prefix``)."""
    return _get("table_prefix", DEFAULT_TABLE_PREFIX)


def default_schema() -> str | None:
    """Database schema of the state tables (``[selfheal] schema``); empty means the connection's default."""
    return _get("schema", "") or None
