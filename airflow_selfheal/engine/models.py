"""Values the engine takes and gives: its settings, who runs an interval, the summary, the checksum."""

from __future__ import annotations

import datetime as dt
import hashlib
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

REASONS = ("scheduled", "retry", "backfill", "catch-up", "redrive", "manual", "lookback", "rollback")


@dataclass(frozen=True)
class EngineSettings:
    """
    How an interval is processed.

    :param pipeline: name of the pipeline in the ledger and the dead-letter table.
    :param chunk_size: records read and written per chunk; memory is bounded by it.
    :param max_dead_letter_ratio: above this share of dead-lettered records the interval is not
        committed and the task fails: a bug is likelier than bad data. ``None`` disables it.
    :param max_dead_letters: the same as an absolute count. ``None`` disables it.
    :param dead_letter_grace: this many dead letters never trip the ratio (one poison record in a
        tiny interval is data, not a bug).
    :param ordered: refuse to commit while an earlier interval is missing, failed or unfinished.
    :param keep_versions: keep the destination rows replaced by the last k versions, for rollback.
    :param stale_after: a claim older than this is presumed dead and may be taken over.
    """

    pipeline: str
    chunk_size: int = 10_000
    max_dead_letter_ratio: float | None = 0.05
    max_dead_letters: int | None = None
    dead_letter_grace: int = 1
    ordered: bool = False
    keep_versions: int = 0
    stale_after: dt.timedelta = dt.timedelta(hours=1)
    ordered_origin: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not self.pipeline or len(self.pipeline) > 200:
            raise ValueError(f"pipeline={self.pipeline!r} must be a non-empty name of at most 200 characters")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be at least 1")
        if self.max_dead_letter_ratio is not None and not 0 <= self.max_dead_letter_ratio <= 1:
            raise ValueError(f"max_dead_letter_ratio={self.max_dead_letter_ratio} must be between 0 and 1")
        if self.max_dead_letters is not None and self.max_dead_letters < 0:
            raise ValueError(f"max_dead_letters={self.max_dead_letters} must be >= 0")
        if self.keep_versions < 0:
            raise ValueError(f"keep_versions={self.keep_versions} must be >= 0")


@dataclass
class RunSummary:
    """What one interval run did; logged as one line and returned as the task's XCom."""

    pipeline: str
    interval_start: str
    interval_end: str
    reason: str
    rows_read: int = 0
    rows_written: int = 0
    rows_dead_lettered: int = 0
    retries: int = 0
    version: int | None = None
    checksum: str | None = None
    seconds: float = 0.0
    status: str = "done"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"pipeline={self.pipeline} interval=[{self.interval_start}, {self.interval_end}) status={self.status} "
            f"read={self.rows_read} written={self.rows_written} dead_lettered={self.rows_dead_lettered} "
            f"retries={self.retries} version={self.version} seconds={self.seconds:.2f}"
        )


@dataclass
class RunContext:
    """Who is running the interval (for the ledger, dead letters and heal events)."""

    reason: str = "manual"
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    try_number: int | None = None


class Checksum:
    """
    Order-independent content checksum of an interval's rows.

    For a row with column names ``k1 < k2 < ... < kn`` (sorted) the row digest is
    ``blake2b_128(repr((k1, ..., kn)) + repr((row[k1], ..., row[kn])))`` read as an integer, and
    ``checksum = (count, sum(row digests) mod 2**128)``, written as ``<count hex>-<sum hex>``.
    A sum does not depend on row (or column) order, and it extends: adding rows to an interval
    (a redrive) adds their digests. Column names are hashed once per shape of row, not per row,
    which keeps this off the hot path of a catch-up.
    """

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    @classmethod
    def resume(cls, hexdigest: str | None) -> Checksum:
        """A checksum that continues from a stored ``hexdigest`` (empty when there is none)."""
        checksum = cls()
        if hexdigest and "-" in hexdigest:
            count, total = hexdigest.split("-", 1)
            checksum.count, checksum.total = int(count, 16), int(total, 16)
        return checksum

    def add(self, row: Mapping[str, Any]) -> None:
        self.add_many((row,))

    def add_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add each of ``rows`` (one loop: a catch-up adds a million rows this way)."""
        from_bytes = int.from_bytes
        total, count = self.total, self.count
        for row in rows:
            values_of, prefix = _row_codec(tuple(row))
            digest = prefix.copy()
            digest.update(repr(values_of(row)).encode())
            total += from_bytes(digest.digest())
            count += 1
        self.total, self.count = total % _MODULUS, count

    def hexdigest(self) -> str:
        return f"{self.count:x}-{self.total % _MODULUS:032x}"


_MODULUS = 2**128
_CODECS: dict[tuple[str, ...], tuple[Callable[[Mapping[str, Any]], tuple[Any, ...]], Any]] = {}


def _row_codec(shape: tuple[str, ...]) -> tuple[Callable[[Mapping[str, Any]], tuple[Any, ...]], Any]:
    """For one shape of row: its values in sorted-name order, and a hash that has taken the names."""
    codec = _CODECS.get(shape)
    if codec is None:
        names = tuple(sorted(shape))
        values_of: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(names) == 1:
            only = names[0]
            values_of = lambda row: (row[only],)  # noqa: E731 - itemgetter of one name returns a bare value
        else:
            values_of = operator.itemgetter(*names)
        if len(_CODECS) > 1024:  # shapes come from code, not data; bound the cache anyway
            _CODECS.clear()
        codec = _CODECS[shape] = (values_of, hashlib.blake2b(repr(names).encode(), digest_size=16))
    return codec
