"""
``airflow selfheal dlq list|show|redrive|discard|park``: inspect and act on dead letters.

``redrive`` re-queues: it puts letters back to ``pending`` and the next ``DeadLetterRedriveOperator``
run of their pipeline processes them. The command line has no transform and no destination to run
a record through, and running it there would bypass the pipeline's rate limit and circuit breaker.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from airflow_selfheal.cli.common import (
    STRUCTURED,
    CliError,
    Store,
    cell,
    command,
    emit,
    open_store,
    parse_ids,
    print_structured,
    shorten,
)
from airflow_selfheal.store.letters import DeadLetter
from airflow_selfheal.store.payload import to_jsonable
from airflow_selfheal.store.schema import DISCARDED, PARKED, PENDING


def _summary(letter: DeadLetter, *, wide: bool) -> dict[str, Any]:
    """A letter without its payload: everything for scripts (``wide``), the telling columns for people."""
    key = None if letter.record_key is None else json.dumps(to_jsonable(letter.record_key))
    row: dict[str, Any] = {
        "id": letter.id,
        "pipeline": letter.pipeline,
        "status": letter.status,
        "attempts": letter.attempts,
        "stage": letter.stage,
        "error_class": letter.error_class,
        "error": letter.error_message if wide else shorten(letter.error_message, 60),
        "record_key": to_jsonable(letter.record_key) if wide else shorten(key, 30),
        "interval_start": letter.interval.start if letter.interval else None,
        "last_seen": letter.last_seen,
    }
    if wide:
        row.update(
            interval_end=letter.interval.end if letter.interval else None,
            first_seen=letter.first_seen,
            dag_id=letter.dag_id,
            task_id=letter.task_id,
            run_id=letter.run_id,
            payload_bytes=letter.payload_bytes,
            payload_truncated=letter.payload_truncated,
            payload_sha256=letter.payload_sha256,
            resolved_at=letter.resolved_at,
        )
    return row


@command
def dlq_list(args: argparse.Namespace) -> None:
    store = open_store(args)
    if args.pipeline:
        store.require_pipeline(args.pipeline)
    letters = store.letters.list_letters(
        pipeline=args.pipeline,
        statuses=[args.status] if args.status else None,
        error_class=args.error_class,
        after_id=args.after_id,
        limit=args.limit,
    )
    wide = args.output in STRUCTURED
    emit([_summary(letter, wide=wide) for letter in letters], args.output, empty="No dead letters match")


@command
def dlq_show(args: argparse.Namespace) -> None:
    store = open_store(args)
    [letter_id] = parse_ids([args.letter_id])
    letter = store.letters.get(letter_id)
    if letter is None:
        raise CliError(f"dead letter {letter_id} does not exist")
    detail = _summary(letter, wide=True)
    detail.update(
        record_identity=letter.record_identity,
        claimed_at=letter.claimed_at,
        payload=json.loads(letter.payload_text),  # as stored: tagged JSON, readable by any tool
        traceback=letter.traceback,
    )
    if args.output in STRUCTURED:
        print_structured(detail, args.output)
        return
    payload, tb = detail.pop("payload"), detail.pop("traceback")
    width = max(len(key) for key in detail)
    for key, value in detail.items():
        print(f"{key:<{width}}  {cell(value)}")
    print("\npayload:")
    print(json.dumps(payload, indent=2, ensure_ascii=False))
    print("\ntraceback:")
    print(tb or "(none recorded)")


def _act(store: Store, letters: Sequence[DeadLetter], status: str, output: str, *, reset_attempts: bool = True) -> None:
    ids = [letter.id for letter in letters]
    if status == PENDING:
        store.letters.requeue(ids, reset_attempts=reset_attempts)
    else:
        store.letters.set_status(ids, status)
    by_pipeline: dict[str, list[int]] = defaultdict(list)
    for letter in letters:
        by_pipeline[letter.pipeline].append(letter.id)
    for pipeline, pipeline_ids in by_pipeline.items():
        store.audit(f"dead_letters_{'requeued' if status == PENDING else status}", pipeline, {"ids": pipeline_ids})
    rows = []
    for letter in letters:
        now = store.letters.get(letter.id)
        rows.append(
            {
                "id": letter.id,
                "pipeline": letter.pipeline,
                "previous_status": letter.status,
                "status": now.status if now else None,
                "attempts": now.attempts if now else None,
            }
        )
    emit(rows, output, empty="No dead letters match; nothing changed")


@command
def dlq_redrive(args: argparse.Namespace) -> None:
    store = open_store(args)
    if args.letter_ids:
        if args.pipeline or args.error_class:
            raise CliError("give dead letter ids or filters (--pipeline, --status, --error-class), not both")
        letters = store.letters_by_id(parse_ids(args.letter_ids))
    else:
        if not args.pipeline:
            raise CliError("give dead letter ids, or --pipeline (with --status and --error-class) to select them")
        store.require_pipeline(args.pipeline)
        letters = store.letters.list_letters(
            pipeline=args.pipeline, statuses=[args.status], error_class=args.error_class, limit=None
        )
    _act(store, letters, PENDING, args.output, reset_attempts=not args.keep_attempts)
    if letters and args.output not in STRUCTURED:
        print(
            f"Re-queued {len(letters)} dead letter(s); the next DeadLetterRedriveOperator run of the pipeline "
            "processes them."
        )


@command
def dlq_discard(args: argparse.Namespace) -> None:
    store = open_store(args)
    _act(store, store.letters_by_id(parse_ids(args.letter_ids)), DISCARDED, args.output)


@command
def dlq_park(args: argparse.Namespace) -> None:
    store = open_store(args)
    _act(store, store.letters_by_id(parse_ids(args.letter_ids)), PARKED, args.output)
