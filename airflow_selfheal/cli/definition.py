"""
Definition of the ``airflow selfheal`` command group, named in the provider's ``cli`` entry.

Airflow calls :func:`get_selfheal_cli_commands` at every ``airflow`` start, for every command, so
this module imports nothing heavy: command bodies load lazily, only when one of them runs.
"""

from __future__ import annotations

from airflow.cli.cli_config import (
    ARG_OUTPUT,
    ARG_VERBOSE,
    ActionCommand,
    Arg,
    GroupCommand,
    lazy_load_command,
    positive_int,
)

_PACKAGE = "airflow_selfheal.cli"
_DLQ_STATUSES = ("pending", "redriving", "resolved", "parked", "discarded")

# -- options every command takes --------------------------------------------------------------
ARG_CONN_ID = Arg(
    ("--conn-id",),
    help="Airflow connection of the state store (default: the selfheal conn_id setting, itself selfheal_default)",
)
ARG_TABLE_PREFIX = Arg(
    ("--table-prefix",), help="Prefix of the state tables (default: the selfheal table_prefix setting)"
)
ARG_SCHEMA = Arg(("--schema",), help="Schema/database of the state tables (default: the selfheal schema setting)")
STORE_ARGS = (ARG_CONN_ID, ARG_TABLE_PREFIX, ARG_SCHEMA, ARG_OUTPUT, ARG_VERBOSE)

# -- per-command options ----------------------------------------------------------------------
ARG_PIPELINE_FILTER = Arg(("--pipeline",), help="Only this pipeline")
ARG_PIPELINE = Arg(("pipeline",), help="Pipeline name (as in the checkpoint ledger)")
ARG_START = Arg(("--start",), help="Window start, ISO 8601; naive means UTC (default: the first ledger interval)")
ARG_END = Arg(("--end",), help="Window end, ISO 8601; naive means UTC (default: the end of the newest ledger interval)")
ARG_DAG_ID = Arg(("--dag-id",), help="Compare with this DAG's own timetable (read from Airflow's metadata database)")
ARG_DLQ_STATUS = Arg(("--status",), help="Only letters with this status", choices=_DLQ_STATUSES)
ARG_ERROR_CLASS = Arg(("--error-class",), help="Only letters whose error class is exactly this, e.g. ValueError")
ARG_LIMIT = Arg(
    ("--limit",), help="Most letters to show (default: 100)", type=positive_int(allow_zero=False), default=100
)
ARG_AFTER_ID = Arg(("--after-id",), help="Page on: only letters with a larger id", type=positive_int(allow_zero=True))
ARG_LETTER_ID = Arg(("letter_id",), help="Dead letter id", metavar="ID")
ARG_LETTER_IDS = Arg(("letter_ids",), help="Dead letter ids", metavar="ID", nargs="+")
ARG_REDRIVE_IDS = Arg(("letter_ids",), help="Dead letter ids (or select by filters)", metavar="ID", nargs="*")
ARG_REDRIVE_STATUS = Arg(
    ("--status",),
    help="With filters: re-queue letters in this status (default: parked)",
    choices=("parked", "discarded", "redriving", "pending"),
    default="parked",
)
ARG_KEEP_ATTEMPTS = Arg(
    ("--keep-attempts",),
    help="Keep the attempt count (default: reset it, giving the letter a full max_attempts budget again)",
    action="store_true",
)
ARG_BREAKER_NAME = Arg(("name",), help="Breaker name")
ARG_OPEN_FOR = Arg(
    ("--open-for",),
    help="Seconds until a probe may go through (default: stay open until 'breaker reset')",
    type=positive_int(allow_zero=False),
    metavar="SECONDS",
)
ARG_REASON = Arg(("--reason",), help="Why, kept as the breaker's last error and in its heal event")


def _action(
    name: str, help_text: str, func: str, args: tuple[Arg, ...], description: str | None = None
) -> ActionCommand:
    return ActionCommand(
        name=name,
        help=help_text,
        func=lazy_load_command(f"{_PACKAGE}.{func}"),
        args=(*args, *STORE_ARGS),
        description=description,
    )


DLQ_COMMANDS = (
    _action(
        "list",
        "List dead letters, oldest first",
        "dlq_command.dlq_list",
        (ARG_PIPELINE_FILTER, ARG_DLQ_STATUS, ARG_ERROR_CLASS, ARG_LIMIT, ARG_AFTER_ID),
    ),
    _action(
        "show", "Show one dead letter with its full payload and traceback", "dlq_command.dlq_show", (ARG_LETTER_ID,)
    ),
    _action(
        "redrive",
        "Re-queue dead letters for the next redrive task",
        "dlq_command.dlq_redrive",
        (ARG_REDRIVE_IDS, ARG_PIPELINE_FILTER, ARG_REDRIVE_STATUS, ARG_ERROR_CLASS, ARG_KEEP_ATTEMPTS),
        description=(
            "Put dead letters back to 'pending', by id or by filters (--pipeline is then required). "
            "The command line has no transform to run them through, so it does not process them itself: "
            "the next DeadLetterRedriveOperator run of the pipeline does, through the pipeline's own "
            "transform and idempotent write path."
        ),
    ),
    _action("discard", "Discard dead letters (never redriven)", "dlq_command.dlq_discard", (ARG_LETTER_IDS,)),
    _action(
        "park", "Park dead letters (kept, not redriven until re-queued)", "dlq_command.dlq_park", (ARG_LETTER_IDS,)
    ),
)

BREAKER_COMMANDS = (
    _action("list", "List circuit breakers and their states", "breaker_command.breaker_list", ()),
    _action(
        "reset", "Close a circuit breaker and forget its counters", "breaker_command.breaker_reset", (ARG_BREAKER_NAME,)
    ),
    _action(
        "open",
        "Open a circuit breaker by hand",
        "breaker_command.breaker_open",
        (ARG_BREAKER_NAME, ARG_OPEN_FOR, ARG_REASON),
        description="Open a breaker by hand, e.g. during a dependency's maintenance; a name not used yet is "
        "created open. It stays open until 'breaker reset' unless --open-for is given.",
    ),
)

SELFHEAL_COMMANDS = (
    _action(
        "status",
        "Per pipeline: watermark, newest done interval, lag, gaps, dead letters; and circuit breakers",
        "status_command.status",
        (ARG_PIPELINE_FILTER,),
        description="Lag is now minus the end of the newest done interval (seconds in JSON). Gaps are "
        "missing, failed and stale intervals between the first and the newest ledger interval.",
    ),
    _action(
        "gaps",
        "Missing, failed and stale intervals of a pipeline",
        "status_command.gaps",
        (ARG_PIPELINE, ARG_START, ARG_END, ARG_DAG_ID),
        description="Without --dag-id: stretches the ledger does not cover, plus failed and stale intervals. "
        "With --dag-id: every interval the DAG's own timetable expects between its start date (or --start) "
        "and now (or --end) that is not done.",
    ),
    GroupCommand(name="dlq", help="Inspect dead letters, re-queue, park or discard them", subcommands=DLQ_COMMANDS),
    GroupCommand(name="breaker", help="Inspect, reset or open circuit breakers", subcommands=BREAKER_COMMANDS),
)


def get_selfheal_cli_commands() -> list[GroupCommand]:
    """The ``selfheal`` group; Airflow adds it to its CLI (the provider's ``cli`` entry names this function)."""
    return [
        GroupCommand(
            name="selfheal",
            help="Self-healing pipelines: checkpoints, gaps, dead letters, circuit breakers",
            subcommands=SELFHEAL_COMMANDS,
        )
    ]
