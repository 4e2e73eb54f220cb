"""Values the engine takes and gives: its settings, who runs an interval, the summary, the checksum."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
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

    ``checksum = (count, sum(blake2b_128(repr(sorted(row.items())))) mod 2**128)``, written as
    ``<count hex>-<sum hex>``. A sum does not depend on row order, and it extends: adding rows to an
    interval (a redrive) adds their digests.
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
        digest = hashlib.blake2b(repr(sorted(row.items())).encode(), digest_size=16).digest()
        self.total = (self.total + int.from_bytes(digest)) % 2**128
        self.count += 1

    def hexdigest(self) -> str:
        return f"{self.count:x}-{self.total:032x}"
