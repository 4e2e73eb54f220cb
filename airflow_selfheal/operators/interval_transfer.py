"""Move one data interval from a SQL source to a SQL destination, self-healing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow_selfheal.engine.sources import RecordSource, SqlSource
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.interval import SelfHealIntervalOperator


class SqlIntervalTransferOperator(SelfHealIntervalOperator):
    """
    Reads the interval's rows with ``sql`` from ``source_conn_id``, transforms them, writes them idempotently.

    The query is a Jinja template rendered per interval with Airflow's context, where
    ``data_interval_start``/``data_interval_end`` are the window really processed (derived from the
    timetable when the run's data interval is empty). Portable bind parameters are also passed:
    ``WHERE ts >= :interval_start AND ts < :interval_end`` compares correctly on every dialect.

    :param source_conn_id: any common-sql connection to read from.
    :param sql: the query (templated).
    :param parameters: extra bind parameters (templated).

    See :class:`~airflow_selfheal.operators.interval.SelfHealIntervalOperator` for the rest.
    """

    template_fields: Sequence[str] = (*SelfHealIntervalOperator.template_fields, "parameters")
    template_ext: Sequence[str] = (".sql",)

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(sql, str) or not sql.strip():
            raise ValueError("sql must be a non-empty query string")
        self.source_conn_id = source_conn_id
        self.sql = sql
        self.parameters = dict(parameters or {})

    def make_source(self, context: Any) -> RecordSource:
        def render(interval: Interval) -> str:
            # Rendered per interval so that batched catch-up and derived windows see their own bounds.
            window_context = {
                **context,
                "data_interval_start": interval.start,
                "data_interval_end": interval.end,
                "interval_start": interval.start,
                "interval_end": interval.end,
            }
            return str(self.render_template(self.sql, window_context))  # type: ignore[arg-type]

        return SqlSource(conn_id=self.source_conn_id, render_sql=render, parameters=self.parameters)
