"""The operator behind ``@task.selfheal``: the user's function produces the interval's records."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from airflow.sdk.bases.decorator import DecoratedOperator

from airflow_selfheal.engine.sources import CallableSource, RecordSource
from airflow_selfheal.intervals import Interval
from airflow_selfheal.operators.interval import SelfHealIntervalOperator

_WINDOW_ARGUMENTS = ("interval", "data_interval_start", "data_interval_end")


class SelfHealTaskOperator(DecoratedOperator, SelfHealIntervalOperator):
    """
    Runs ``python_callable`` for the interval and writes what it returns or yields (dicts or tuples).

    The function may take ``interval`` (an :class:`~airflow_selfheal.intervals.Interval`) and/or
    ``data_interval_start``/``data_interval_end``: they receive the window really processed.
    """

    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, *SelfHealIntervalOperator.template_fields)
    custom_operator_name = "@task.selfheal"

    def __init__(self, *, python_callable: Callable[..., Iterable[Any] | None], **kwargs: Any) -> None:
        op_kwargs = dict(kwargs.pop("op_kwargs", None) or {})
        # `interval` is filled at run time; give it a placeholder so the signature check passes.
        if "interval" in inspect.signature(python_callable).parameters:
            op_kwargs.setdefault("interval", None)
        super().__init__(python_callable=python_callable, op_kwargs=op_kwargs, **kwargs)

    def make_source(self, context: Any) -> RecordSource:
        accepted = inspect.signature(self.python_callable).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        extra = {k: v for k, v in self.op_kwargs.items() if k not in _WINDOW_ARGUMENTS}
        context_args = {
            k: context[k] for k in accepted if k in context and k not in _WINDOW_ARGUMENTS and k not in extra
        }

        def produce(*, interval: Interval) -> Iterable[Any] | None:
            window = {"interval": interval, "data_interval_start": interval.start, "data_interval_end": interval.end}
            window = {k: v for k, v in window.items() if takes_any or k in accepted}
            return self.python_callable(*self.op_args, **extra, **context_args, **window)

        return CallableSource(produce)

    def execute(self, context: Any) -> dict[str, Any]:
        return SelfHealIntervalOperator.execute(self, context)
