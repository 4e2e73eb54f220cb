"""
Read-ahead for batched catch-up: the next interval's records are read on a worker thread while
the current interval is written and committed.

A catch-up interval spends much of its time waiting on the database (the write, the ledger
commit); reading the next interval in that time overlaps two waits. Only reading moves ahead:
claims, writes and commits stay one interval at a time, oldest first, so a crash still loses at
most the interval in flight.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from airflow_selfheal.engine.sources import Record, RecordSource, SqlSource
from airflow_selfheal.intervals import Interval

log = logging.getLogger(__name__)


@dataclass
class _Read:
    records: list[Record]
    complete: bool  # False: the interval has more than one chunk, read it the ordinary way


class ReadAheadSource:
    """
    Wraps a :class:`~airflow_selfheal.engine.sources.SqlSource` for a known, ordered list of intervals.

    When the engine asks for interval ``i``, interval ``i + 1`` starts reading in the background.
    An interval whose records fit in one chunk is served from that read; a larger one, a read that
    failed, or a second request for the same interval (a retry) reads afresh, so errors surface,
    are classified and retried exactly as without read-ahead. At most one extra chunk is held in memory.

    :param source: the SQL source to read from (user functions are not read ahead: they may not be
        thread-safe, and may call services that should see one request at a time).
    :param intervals: the intervals the batch will process, in order.
    :param chunk_size: the engine's chunk size; a read-ahead holds at most this many records.
    """

    def __init__(self, source: SqlSource, intervals: Sequence[Interval], *, chunk_size: int) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self._next = dict(itertools.pairwise(intervals))
        self._reads: dict[Interval, Future[_Read]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfheal-read-ahead")
        self._multi_chunk_seen = False

    def chunks(self, interval: Interval, chunk_size: int) -> Iterator[list[Record]]:
        # Settle this interval's read-ahead first: it tells whether reading ahead pays (one-chunk intervals).
        read = self._result(self._reads.pop(interval, None), interval)
        following = self._next.get(interval)
        if following is not None and following not in self._reads and not self._multi_chunk_seen:
            self._reads[following] = self._executor.submit(self._read, following)
        if read is not None and read.complete:
            if read.records:
                yield read.records
            return
        yield from self.source.chunks(interval, chunk_size)

    def _read(self, interval: Interval) -> _Read:
        chunks = self.source.chunks(interval, self.chunk_size)
        try:
            first = next(chunks, [])
            if len(first) < self.chunk_size:
                return _Read(first, complete=True)
            # A full chunk may have more behind it: stop reading ahead and hand the interval back.
            self._multi_chunk_seen = True
            return _Read([], complete=False)
        finally:
            chunks.close()

    def _result(self, pending: Future[_Read] | None, interval: Interval) -> _Read | None:
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception as error:
            log.debug("Read-ahead of %s failed (%s); reading it again in the task", interval, error)
            return None

    def close(self) -> None:
        """Stop reading ahead; a read in progress finishes and is dropped."""
        for pending in self._reads.values():
            pending.cancel()
        self._reads.clear()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> ReadAheadSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_ahead(source: RecordSource, intervals: Sequence[Interval], *, chunk_size: int) -> ReadAheadSource | None:
    """A read-ahead wrapper for ``source`` when it is safe and worth it, else ``None``."""
    if isinstance(source, SqlSource) and len(intervals) > 1:
        return ReadAheadSource(source, intervals, chunk_size=chunk_size)
    return None
