"""N processes race to claim the same intervals: each interval is claimed exactly once."""

from __future__ import annotations

import multiprocessing
import random

from airflow_selfheal.hooks.checkpoint import CheckpointHook
from tests.hooks.test_checkpoint import T0, hourly

WORKERS = 10
INTERVALS = 40


def _race(conn_id: str, prefix: str, seed: int, barrier, results) -> None:
    hook = CheckpointHook(conn_id, table_prefix=prefix)
    order = hourly(INTERVALS)
    random.Random(seed).shuffle(order)
    barrier.wait()
    won = []
    for interval in order:
        claim = hook.try_claim("race", interval, run_id=f"worker-{seed}", try_number=1)
        if claim is not None:
            hook.commit(claim, reason="scheduled", rows_written=seed)
            won.append(interval.start.isoformat())
    results.put((seed, won))


def test_racing_workers_claim_every_interval_exactly_once(server_database, server_table_prefix) -> None:
    _ = CheckpointHook(server_database.conn_id, table_prefix=server_table_prefix).tables  # create up front
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    workers = [
        ctx.Process(target=_race, args=(server_database.conn_id, server_table_prefix, seed, barrier, results))
        for seed in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    claimed = [start for _, won in outcomes for start in won]
    assert len(claimed) == INTERVALS and len(set(claimed)) == INTERVALS, "each interval exactly once"
    assert sum(1 for _, won in outcomes if won) > 1, "the race had more than one winner overall"

    ledger = CheckpointHook(server_database.conn_id, table_prefix=server_table_prefix)
    entries = ledger.entries("race")
    assert len(entries) == INTERVALS and {e.status for e in entries} == {"done"}
    assert all(len(ledger.versions("race", e.interval)) == 1 for e in entries)
    winners = {start: seed for seed, won in outcomes for start in won}
    assert all(e.rows_written == winners[e.interval.start.isoformat()] for e in entries)
    assert ledger.watermark("race") == hourly(INTERVALS)[-1].end
    assert ledger.watermark("race", origin=T0) == hourly(INTERVALS)[-1].end
