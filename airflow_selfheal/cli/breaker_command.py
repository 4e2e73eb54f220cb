"""``airflow selfheal breaker list|reset|open``: look at and steer circuit breakers by hand."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from airflow_selfheal.cli import breakers
from airflow_selfheal.cli.common import command, emit, open_store


def _show(rows: list[dict[str, Any]], output: str) -> None:
    emit(breakers.for_output(rows, output), output, empty="No circuit breakers")


@command
def breaker_list(args: argparse.Namespace) -> None:
    _show(breakers.breaker_rows(open_store(args)), args.output)


@command
def breaker_reset(args: argparse.Namespace) -> None:
    _show([breakers.reset_breaker(open_store(args), args.name)], args.output)


@command
def breaker_open(args: argparse.Namespace) -> None:
    open_for = dt.timedelta(seconds=args.open_for) if args.open_for else None
    reason = args.reason or "opened by hand with 'airflow selfheal breaker open'"
    _show([breakers.open_breaker(open_store(args), args.name, open_for=open_for, reason=reason)], args.output)
