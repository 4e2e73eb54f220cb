"""The content checksum: what makes two versions of an interval "the same data"."""

from __future__ import annotations

import datetime as dt
import decimal
import random

from airflow_selfheal.engine.models import Checksum


def rows(n: int) -> list[dict[str, object]]:
    return [
        {
            "id": i,
            "ts": dt.datetime(2026, 1, 1, 0, i % 60),
            "amount": decimal.Decimal(i) / 100,
            "status": "paid" if i % 2 else None,
        }
        for i in range(n)
    ]


def checksum_of(items: list[dict[str, object]]) -> str:
    checksum = Checksum()
    checksum.add_many(items)
    return checksum.hexdigest()


def test_the_same_rows_in_any_order_and_column_order_give_the_same_checksum() -> None:
    original = rows(200)
    shuffled = [dict(reversed(list(r.items()))) for r in original]
    random.Random(7).shuffle(shuffled)
    assert checksum_of(original) == checksum_of(shuffled)
    assert checksum_of(original).startswith("c8-"), "the row count (200 = 0xc8) leads the checksum"


def test_a_changed_value_a_renamed_column_or_a_missing_row_changes_it() -> None:
    original = rows(50)
    baseline = checksum_of(original)
    changed = [dict(r) for r in original]
    changed[17]["amount"] = decimal.Decimal("0.18")
    renamed = [{("amount_eur" if k == "amount" else k): v for k, v in r.items()} for r in original]
    assert checksum_of(changed) != baseline
    assert checksum_of(renamed) != baseline
    assert checksum_of(original[:-1]) != baseline


def test_a_stored_checksum_extends_with_added_rows_as_if_computed_at_once() -> None:
    """What redrive relies on: adding the redriven rows to an interval's stored checksum."""
    everything = rows(30)
    first = checksum_of(everything[:20])
    resumed = Checksum.resume(first)
    resumed.add_many(everything[20:])
    assert resumed.hexdigest() == checksum_of(everything)
    assert Checksum.resume(None).hexdigest() == Checksum().hexdigest()


def test_single_column_rows_and_add_agree_with_add_many() -> None:
    one_by_one = Checksum()
    for value in ("a", "b", "c"):
        one_by_one.add({"only": value})
    assert one_by_one.hexdigest() == checksum_of([{"only": "c"}, {"only": "a"}, {"only": "b"}])
    assert one_by_one.hexdigest() != checksum_of([{"only": "a"}, {"only": "b"}, {"only": "d"}])
