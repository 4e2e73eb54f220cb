"""
Plumbing shared by the ``airflow selfheal`` commands: the store named by the options, output, errors.

Output follows Airflow's own CLI: ``--output table`` (default) and ``plain`` render through
:class:`airflow.cli.simple_table.AirflowConsole`; ``json`` and ``yaml`` keep real types (numbers stay
numbers, times are ISO 8601 UTC, durations are seconds), because scripts read them.
Every failure is one line on stderr and exit code 1; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import getpass
import json
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import sqlalchemy as sa

from airflow_selfheal.hooks.checkpoint import CheckpointHook
from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.hooks.heal_events import HealEventHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.letters import DeadLetter
from airflow_selfheal.store.schema import RESOLVED, state_tables

Command = Callable[[argparse.Namespace], None]
STRUCTURED = ("json", "yaml")


class CliError(Exception):
    """A problem the user can fix (bad input, unknown name); printed as one line."""


class Store:
    """The state store named by ``--conn-id``, ``--table-prefix`` and ``--schema``, and its hooks."""

    def __init__(self, conn_id: str | None, table_prefix: str | None, schema: str | None) -> None:
        self.ledger = CheckpointHook(conn_id, table_prefix=table_prefix, schema=schema)
        self.conn_id = self.ledger.selfheal_conn_id
        self.table_prefix = self.ledger.table_prefix
        self.schema = self.ledger.schema

    def _hook_kwargs(self) -> dict[str, Any]:
        return {"table_prefix": self.table_prefix, "schema": self.schema or ""}

    @cached_property
    def letters(self) -> DeadLetterHook:
        return DeadLetterHook(self.conn_id, **self._hook_kwargs())

    @cached_property
    def events(self) -> HealEventHook:
        return HealEventHook(self.conn_id, **self._hook_kwargs())

    def require_tables(self) -> None:
        """Refuse to go on (rather than create empty tables) when the options name no existing store."""
        name = state_tables(self.table_prefix, self.schema).schema_version.name
        if not sa.inspect(self.ledger.engine).has_table(name, schema=self.schema):
            where = f"schema {self.schema!r} of " if self.schema else ""
            raise CliError(
                f"no self-heal state tables with prefix {self.table_prefix!r} in {where}connection {self.conn_id!r} "
                "(check --conn-id, --table-prefix and --schema; tables appear when a pipeline first runs)"
            )

    def pipelines(self) -> list[str]:
        """Pipelines with ledger rows or dead letters."""
        return sorted(set(self.ledger.pipelines()) | set(self.letters.pipelines()))

    def require_pipeline(self, name: str) -> None:
        known = self.pipelines()
        if name not in known:
            listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            raise CliError(f"unknown pipeline {name!r}; known pipelines: {listed or 'none yet'}")

    def letters_by_id(self, ids: Sequence[int]) -> list[DeadLetter]:
        """The letters with these ids; every id must exist and be open (not resolved)."""
        found = []
        for letter_id in ids:
            letter = self.letters.get(letter_id)
            if letter is None:
                raise CliError(f"dead letter {letter_id} does not exist")
            if letter.status == RESOLVED:
                raise CliError(f"dead letter {letter_id} is resolved (its record was written); nothing to change")
            found.append(letter)
        return found

    def audit(self, kind: str, pipeline: str | None, detail: Mapping[str, Any]) -> None:
        """Record a person's action as a heal event; never fails the command."""
        try:
            user = getpass.getuser()
        except Exception:
            user = None
        self.events.record(kind, pipeline=pipeline, detail={**detail, "source": "airflow selfheal CLI", "user": user})


def open_store(args: argparse.Namespace) -> Store:
    store = Store(args.conn_id, args.table_prefix, args.schema)
    store.require_tables()
    return store


def command(func: Command) -> Command:
    """Wrap a command: quiet logs (unless ``--verbose``), provider config loaded, one-line errors, exit 1."""
    from airflow.utils.cli import suppress_logs_and_warning
    from airflow.utils.providers_configuration_loader import providers_configuration_loaded

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> None:
        try:
            func(args)
        except Exception as exc:  # every failure: one clear line, no traceback unless asked for
            if getattr(args, "verbose", False):
                traceback.print_exc()
            print(f"Error: {describe_error(exc, args)}", file=sys.stderr)
            sys.exit(1)

    return suppress_logs_and_warning(providers_configuration_loaded(run))


def describe_error(exc: BaseException, args: argparse.Namespace) -> str:
    if isinstance(exc, sa.exc.DBAPIError):
        conn_id = args.conn_id or "the default connection"
        cause = _first_line(str(exc.orig)) or type(exc.orig).__name__
        return f"the state store (connection {conn_id!r}) failed: {cause}"
    return _first_line(str(exc)) or type(exc).__name__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


# -- parsing ----------------------------------------------------------------------------------


def parse_time(value: str, *, option: str) -> dt.datetime:
    """An ISO 8601 date or date-time; naive means UTC."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"{option}={value!r} is not an ISO 8601 date-time (e.g. 2026-01-01T00:00:00Z)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def parse_ids(values: Iterable[str]) -> list[int]:
    ids = []
    for value in values:
        if not value.isdigit():
            raise CliError(f"dead letter id {value!r} is not a number")
        ids.append(int(value))
    return ids


# -- output -----------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Interval):
        return {"start": value.start.isoformat(), "end": value.end.isoformat()}
    return str(value)


def cell(value: Any) -> Any:
    """How a value reads in a table: short UTC times, rounded durations, blanks for nothing."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, dt.timedelta):
        return human_duration(value)
    return value


def human_duration(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or not parts:
        parts.append(f"{secs}s")
    return sign + " ".join(parts[:2])


def print_structured(data: Any, output: str) -> None:
    """JSON or YAML with real types."""
    text = json.dumps(data, default=_json_value, indent=2, ensure_ascii=False)
    if output == "yaml":
        from airflow.utils import yaml

        print(yaml.dump(json.loads(text)), end="")
    else:
        print(text)


def emit(rows: Sequence[Mapping[str, Any]], output: str, *, empty: str = "No data found") -> None:
    """Print rows as a table (Airflow's console) or as structured data."""
    if output in STRUCTURED:
        print_structured(list(rows), output)
        return
    if not rows:
        print(empty)
        return
    from airflow.cli.simple_table import AirflowConsole

    AirflowConsole().print_as([{key: cell(value) for key, value in row.items()} for row in rows], output)


def shorten(text: str | None, width: int) -> str | None:
    if text is None:
        return None
    line = _first_line(text)
    return line if len(line) <= width else line[: width - 1] + "…"
