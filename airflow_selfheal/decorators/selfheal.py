"""``@task.selfheal``: a TaskFlow function that yields an interval's records, written self-healingly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.sdk.bases.decorator import TaskDecorator, task_decorator_factory

from airflow_selfheal.operators.selfheal_task import SelfHealTaskOperator


def selfheal_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """
    Wrap a function into a :class:`~airflow_selfheal.operators.selfheal_task.SelfHealTaskOperator`.

    The keyword arguments are the operator's (``destination_conn_id``, ``destination_table``,
    ``write_strategy``, ``key_columns``, ``transform`` ...); the function returns or yields records.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=False,
        decorated_operator_class=SelfHealTaskOperator,
        **kwargs,
    )
