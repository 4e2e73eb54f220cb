from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import multiprocessing
import time
from typing import Any

import pytest

from airflow_selfheal.hooks.dead_letter import DeadLetterHook
from airflow_selfheal.intervals import Interval
from airflow_selfheal.store.letters import FailedRecord

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


class Slotted:
    """An object without ``__dict__``: JSON cannot hold it and ``vars()`` fails on it."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Slotted({self.value})"


@pytest.fixture
def letters(database, table_prefix) -> DeadLetterHook:
    return DeadLetterHook(database.conn_id, table_prefix=table_prefix)


def failed(
    key: object, error: BaseException | None = None, *, pipeline: str = "orders", **kwargs: object
) -> FailedRecord:
    return FailedRecord(
        pipeline=pipeline,
        payload={"key": key},
        error=error or ValueError(f"bad {key}"),
        stage="transform",
        record_key=key,
        **kwargs,  # type: ignore[arg-type]
    )


def test_non_json_payloads_read_back_faithful_and_bounded(letters: DeadLetterHook) -> None:
    when = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.UTC)
    payload = {
        "when": when,
        "amount": decimal.Decimal("12345678901234567890.123456789"),
        "tags": {"b", "a"},
        "blob": b"\x00\xffbinary",
        "slotted": Slotted(7),
    }
    huge = "x" * (10 * 1024 * 1024)
    letters.add(
        [
            FailedRecord(pipeline="p", payload=payload, error=TypeError("no"), stage="write", record_key=1),
            FailedRecord(pipeline="p", payload=huge, error=MemoryError(), stage="read", record_key=2),
        ]
    )
    small, big = letters.list_letters(pipeline="p")
    back = small.payload
    assert back["when"] == when and back["when"].tzinfo is not None
    assert back["amount"] == payload["amount"] and isinstance(back["amount"], decimal.Decimal)
    assert back["tags"] == {"a", "b"}
    assert back["blob"] == b"\x00\xffbinary"
    assert back["slotted"] == "Slotted(7)", "objects without __dict__ fall back to their repr"
    assert not small.payload_truncated

    full_json = json.dumps(huge, ensure_ascii=False).encode()
    assert big.payload_truncated
    assert big.payload_bytes == len(full_json)
    assert big.payload_sha256 == hashlib.sha256(full_json).hexdigest(), "the hash covers what was cut"
    assert len(big.payload_text.encode()) <= letters.max_payload_bytes
    assert big.payload["head"].startswith('"xxxx')
    assert (big.stage, big.error_class) == ("read", "MemoryError")


def test_the_same_record_failing_again_updates_its_row(letters: DeadLetterHook) -> None:
    interval = Interval(T0, T0 + HOUR)
    letters.add([failed(1, ValueError("first"), interval=interval, run_id="r1")])
    first = letters.list_letters()[0]
    time.sleep(0.01)
    letters.add([failed(1, KeyError("second"), interval=interval, run_id="r2")])
    [again] = letters.list_letters()
    assert again.id == first.id, "no duplicate row for the same record"
    assert (again.attempts, again.error_class, again.error_message, again.run_id) == (2, "KeyError", "'second'", "r2")
    assert again.last_seen > first.last_seen and again.first_seen == first.first_seen
    assert again.interval == interval and again.record_key == 1

    # Without a key the content identifies the record; two failures in one batch count twice.
    keyless = FailedRecord(pipeline="orders", payload={"a": 1}, error=ValueError("x"), stage="read")
    letters.add([keyless, keyless])
    assert letters.count() == 2
    assert letters.list_letters(error_class="ValueError")[0].attempts == 2


def test_parked_and_discarded_stay_so_when_the_record_fails_again(letters: DeadLetterHook) -> None:
    letters.add([failed(1), failed(2), failed(3)])
    one, two, three = letters.list_letters()
    assert letters.set_status([one.id], "parked") == 1
    assert letters.set_status([two.id], "discarded") == 1
    letters.set_status([three.id], "resolved")
    letters.add([failed(1), failed(2), failed(3)])
    assert [(x.status, x.attempts) for x in letters.list_letters()] == [
        ("parked", 2),
        ("discarded", 2),
        ("pending", 2),  # a resolved record that fails again is open again
    ]
    with pytest.raises(ValueError, match="status='gone' unknown"):
        letters.set_status([one.id], "gone")


def test_filters_and_paging(letters: DeadLetterHook) -> None:
    early, late = Interval(T0, T0 + HOUR), Interval(T0 + HOUR, T0 + 2 * HOUR)
    letters.add([failed(i, ValueError("v"), interval=early) for i in range(5)])
    letters.add([failed(i, KeyError("k"), interval=late) for i in range(5, 8)])
    letters.add([failed(99, pipeline="other")])
    letters.set_status([letters.list_letters(pipeline="orders")[0].id], "parked")

    assert letters.count(pipeline="orders") == 8
    assert letters.count(pipeline="orders", statuses=["pending"]) == 7
    assert len(letters.list_letters(pipeline="orders", error_class="KeyError")) == 3
    assert [x.record_key for x in letters.list_letters(statuses=["parked"])] == [0]
    assert {x.record_key for x in letters.list_letters(interval_from=late.start)} == {5, 6, 7}
    assert {x.record_key for x in letters.list_letters(pipeline="orders", interval_to=early.end)} == set(range(5))
    assert letters.list_letters(older_than=HOUR) == []
    assert len(letters.list_letters(newer_than=HOUR)) == 9
    assert letters.status_counts(pipeline="orders") == {
        "pending": 7,
        "redriving": 0,
        "resolved": 0,
        "parked": 1,
        "discarded": 0,
    }
    assert letters.pipelines() == ["orders", "other"]

    seen: list[int] = []
    after: int | None = None
    while page := letters.list_letters(pipeline="orders", after_id=after, limit=3):
        seen.extend(x.id for x in page)
        after = page[-1].id
    assert len(seen) == 8 and seen == sorted(seen)
    with pytest.raises(ValueError, match="unknown"):
        letters.list_letters(statuses=["nope"])


def test_redrive_claims_resolve_fail_and_park(letters: DeadLetterHook) -> None:
    letters.add([failed(i, ValueError("v")) for i in range(4)] + [failed(9, KeyError("k"))])
    letters.add([failed(50, pipeline="other")])
    batch = letters.claim_for_redrive("orders", limit=2)
    assert [x.record_key for x in batch] == [0, 1], "oldest first, at most limit"
    assert all(x.status == "redriving" and x.claim_token for x in batch)
    assert [x.record_key for x in letters.claim_for_redrive("orders", limit=10, error_class="KeyError")] == [9]
    rest = letters.claim_for_redrive("orders", limit=10)
    assert [x.record_key for x in rest] == [2, 3], "claimed letters are not handed out twice"
    assert letters.claim_for_redrive("orders", limit=10) == []

    assert letters.redrive_succeeded(batch) == 2
    assert letters.redrive_succeeded(batch) == 0, "a resolved letter is not resolved twice"
    assert letters.redrive_failed(rest[0], RuntimeError("still broken"), max_attempts=3) == "pending"
    assert letters.redrive_failed(rest[1], RuntimeError("still broken"), max_attempts=2) == "parked"
    retried = letters.get(rest[0].id)
    assert retried is not None
    assert (retried.status, retried.attempts, retried.error_class, retried.claim_token) == (
        "pending",
        2,
        "RuntimeError",
        None,
    )
    assert retried.traceback is None or "RuntimeError" in retried.traceback
    # A parked letter is never picked up automatically, and stays parked.
    assert [x.record_key for x in letters.claim_for_redrive("orders", limit=10)] == [2]
    assert letters.get(rest[1].id).status == "parked"  # type: ignore[union-attr]
    assert letters.requeue([rest[1].id, batch[0].id]) == 1, "resolved letters are not re-queued"
    requeued = letters.get(rest[1].id)
    assert requeued is not None and (requeued.status, requeued.attempts) == ("pending", 1)
    with pytest.raises(ValueError, match="limit=0"):
        letters.claim_for_redrive("orders", limit=0)


def test_stale_redrive_claims_expire_and_the_dead_redrive_changes_nothing(letters: DeadLetterHook) -> None:
    letters.add([failed(1), failed(2)])
    dead = letters.claim_for_redrive("orders", limit=2)
    assert letters.claim_for_redrive("orders", limit=2) == [], "a live claim is respected"
    taker = letters.claim_for_redrive("orders", limit=2, stale_after=dt.timedelta(0))
    assert [x.id for x in taker] == [x.id for x in dead]
    assert letters.redrive_succeeded(dead) == 0, "the dead redrive's token no longer matches"
    assert letters.redrive_failed(dead[0], ValueError("late"), max_attempts=1) is None
    assert letters.redrive_succeeded(taker) == 2
    with pytest.raises(ValueError, match="no claim token"):
        letters.redrive_succeeded([letters.get(dead[0].id)])  # type: ignore[list-item]


def test_a_record_failing_again_while_redriving_reopens_the_letter(letters: DeadLetterHook) -> None:
    letters.add([failed(1)])
    [claimed] = letters.claim_for_redrive("orders", limit=1)
    letters.add([failed(1, KeyError("new run failed too"))])
    assert letters.redrive_succeeded([claimed]) == 0
    assert letters.get(claimed.id).status == "pending"  # type: ignore[union-attr]


def _redrive_worker(conn_id: str, prefix: str, start: Any, out: Any) -> None:
    hook = DeadLetterHook(conn_id, table_prefix=prefix)
    claimed: list[int] = []
    start.wait()
    while batch := hook.claim_for_redrive("race", limit=7):
        claimed.extend(x.id for x in batch)
        hook.redrive_succeeded(batch)
    out.put(claimed)


def test_concurrent_redrives_claim_every_letter_exactly_once(server_database, server_table_prefix) -> None:
    hook = DeadLetterHook(server_database.conn_id, table_prefix=server_table_prefix)
    hook.add([failed(i, pipeline="race") for i in range(300)])
    ids = sorted(x.id for x in hook.list_letters(pipeline="race", limit=None))
    # fork: each child builds its own engine (engines are cached per process id).
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_redrive_worker, args=(server_database.conn_id, server_table_prefix, start, out))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    claimed = [letter_id for result in results for letter_id in result]
    assert sorted(claimed) == ids, "every letter claimed exactly once"
    assert sum(1 for result in results if result) >= 2, "the redrives really ran side by side"
    assert hook.status_counts(pipeline="race")["resolved"] == 300
