"""
Real-time runs during a long catch-up: how late do they start? (issue 5, "order and fairness")

Catch-up work runs in its own pool, ``selfheal_catchup`` (created through ``POST /api/v2/pools``), with
``priority_weight=1``; the real-time DAG's task keeps the default pool and ``priority_weight=10``.
A real-time run is triggered every ``--every`` seconds, ``--samples`` times, in each phase:

1. baseline: nothing else runs;
2. batched catch-up: one ``catch_up=True`` task works through ``--catch-up-intervals`` missed hours
   (pool of 1 slot);
3. backfill catch-up: ``POST /api/v2/backfills`` of ``--backfill-intervals`` runs with
   ``max_active_runs=4`` (pool resized to ``--backfill-pool-slots``); cancelled once the samples are in;
4. control, short tasks: the same backfill in ``default_pool`` at the real-time task's priority;
5. control, long tasks: ``parallelism`` batched catch-up tasks (one per pipeline, ``--long-intervals``
   each) in ``default_pool`` at the real-time task's priority: what the pool protects against.
   ``--no-control`` skips 4 and 5.

A run's start delay is its task instance's ``start_date`` minus the run's ``queued_at`` (REST).
Every destination must hold exactly the source rows of the intervals that ran (else exit 1).
Run from the repository root: ``.venv/bin/python -m benchmarks.catch_up_fairness``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import (
    HOUR,
    CorrectnessError,
    Scratch,
    all_runs,
    check_destination,
    create_destination,
    create_source,
    dag_file,
    describe,
    exit_status,
    parse_time,
    pg_engine,
    running_airflow,
    say,
    seconds,
    task_instance,
    write_dags,
)
from tests.airflow_harness import AirflowServer, AirflowServerError

POOL = "selfheal_catchup"
EXECUTOR_SLOTS = 4  # [core] parallelism of the harness's stack (tests/airflow_harness.py)
PHASES = 5  # baseline, batched, backfill and two controls: each takes its own real-time hours


@dataclass
class Setup:
    catch_up_intervals: int
    backfill_intervals: int
    long_intervals: int
    long_tasks: int
    rows: int
    samples: int
    every: float
    backfill_pool_slots: int
    t0: dt.datetime
    suffix: str
    source: str = ""
    dests: dict[str, str] = field(default_factory=dict)
    prefix: str = ""

    def dag(self, role: str) -> str:
        return f"fair_{role}_{self.suffix}"

    def realtime_hour(self, k: int) -> int:
        """Real-time sample k processes this source hour (past the catch-up's hours)."""
        return self.catch_up_intervals + 1 + k

    def hours(self) -> int:
        return self.realtime_hour(PHASES * self.samples)

    def window(self, hour: int) -> tuple[dt.datetime, dt.datetime]:
        return self.t0 + hour * HOUR, self.t0 + (hour + 1) * HOUR


def sample_realtime(server: AirflowServer, setup: Setup, first_k: int) -> list[dict[str, Any]]:
    """Trigger the real-time DAG ``samples`` times, ``every`` seconds apart; return each run's start delay."""
    dag_id = setup.dag("realtime")
    started = time.monotonic()
    run_ids = []
    for i in range(setup.samples):
        time.sleep(max(0.0, started + i * setup.every - time.monotonic()))
        # An @hourly run processes the hour before its logical date.
        logical = setup.window(setup.realtime_hour(first_k + i))[1]
        run_ids.append(server.trigger(dag_id, logical_date=logical))
    samples = []
    for run_id in run_ids:
        state = server.wait_for_run(dag_id, run_id, timeout=300)
        if state != "success":
            raise CorrectnessError(f"real-time run {run_id} ended {state}:\n{server.task_log(dag_id, run_id, 'load')}")
        run = server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        ti = task_instance(server, dag_id, run_id)
        samples.append(
            {
                "run_id": run_id,
                "queued_at": run["queued_at"],
                "delay": seconds(ti["start_date"], run["queued_at"]),
                "duration": seconds(ti["end_date"], ti["start_date"]),
            }
        )
    say("  start delays: " + ", ".join(f"{s['delay']:.1f}" for s in samples) + " s")
    return samples


def wait_for_state(server: AirflowServer, dag_id: str, run_id: str, states: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ti = task_instance(server, dag_id, run_id)
        if ti["state"] in states:
            return ti
        if time.monotonic() > deadline:
            raise AirflowServerError(f"{dag_id}/{run_id} task still {ti['state']}\n{server.diagnostics()}")
        time.sleep(0.5)


def during(samples: list[dict[str, Any]], start: str | None, end: str | None) -> list[dict[str, Any]]:
    """The samples that were queued while the catch-up task ran (only these measure the catch-up)."""
    a, b = parse_time(start), parse_time(end)
    return [s for s in samples if a and b and a <= (parse_time(s["queued_at"]) or a) <= b]


def phase_batched(server: AirflowServer, setup: Setup) -> dict[str, Any]:
    dag_id = setup.dag("catchup")
    run_id = server.trigger(dag_id, logical_date=setup.window(setup.catch_up_intervals)[1])
    wait_for_state(server, dag_id, run_id, {"running", "success", "failed"}, timeout=120)
    say(f"  catch-up task running ({setup.catch_up_intervals} intervals); sampling real-time runs")
    samples = sample_realtime(server, setup, first_k=setup.samples)
    state = server.wait_for_run(dag_id, run_id, timeout=900)
    if state != "success":
        raise CorrectnessError(f"catch-up run ended {state}:\n{server.task_log(dag_id, run_id, 'load')[-4000:]}")
    ti = task_instance(server, dag_id, run_id)
    say(f"  catch-up finished after {seconds(ti['end_date'], ti['start_date']):.0f} s")
    return {"samples": samples, "during": during(samples, ti["start_date"], ti["end_date"])}


def phase_backfill(server: AirflowServer, setup: Setup, role: str, first_k: int) -> dict[str, Any]:
    """Backfill ``backfill_intervals`` runs of the ``role`` DAG and sample real-time runs meanwhile."""
    dag_id = setup.dag(role)
    backfill = server.api(
        "POST",
        "/backfills",
        json={
            "dag_id": dag_id,
            "from_date": setup.window(0)[1].isoformat(),
            "to_date": setup.window(setup.backfill_intervals - 1)[1].isoformat(),
            "reprocess_behavior": "none",
            "max_active_runs": 4,
        },
    )
    deadline = time.monotonic() + 120
    while not any(r["state"] == "success" for r in all_runs(server, dag_id, run_type="backfill")):
        if time.monotonic() > deadline:
            raise AirflowServerError(f"no backfill run finished in 120 s\n{server.diagnostics()}")
        time.sleep(1)
    say(f"  backfill of {setup.backfill_intervals} runs under way; sampling real-time runs")
    samples = sample_realtime(server, setup, first_k=first_k)
    runs = all_runs(server, dag_id, run_type="backfill")
    busy = sum(1 for r in runs if r["state"] in ("queued", "running"))
    server.api("PUT", f"/backfills/{backfill['id']}/cancel")
    say(f"  backfill cancelled with {busy} runs still queued or running; letting the running ones finish")
    deadline = time.monotonic() + 300
    while True:
        runs = all_runs(server, dag_id, run_type="backfill")
        if all(r["state"] in ("success", "failed") for r in runs):
            break
        if time.monotonic() > deadline:
            raise AirflowServerError(f"backfill runs did not settle\n{server.diagnostics()}")
        time.sleep(1)
    done = [r for r in runs if r["state"] == "success"]
    # Cancelling fails the runs that never started; a task that failed is a real failure.
    task_failures = server.api(
        "GET", f"/dags/{dag_id}/dagRuns/~/taskInstances", params={"state": ["failed", "upstream_failed"], "limit": 1}
    )["total_entries"]
    if task_failures:
        raise CorrectnessError(f"{task_failures} backfill task instances failed")
    # An @hourly run processes the hour before its logical date.
    hours = [round((dt.datetime.fromisoformat(r["logical_date"]) - setup.t0) / HOUR) - 1 for r in done]
    return {"samples": samples, "during": samples if busy else [], "done_hours": hours, "busy": busy}


def phase_long_tasks(server: AirflowServer, setup: Setup, first_k: int) -> dict[str, Any]:
    """As many long catch-up tasks as the executor has slots, outside the pool; sample real-time runs meanwhile."""
    runs = {}
    for i in range(setup.long_tasks):
        dag_id = setup.dag(f"long{i}")
        runs[dag_id] = server.trigger(dag_id, logical_date=setup.window(setup.long_intervals)[1])
    for dag_id, run_id in runs.items():
        wait_for_state(server, dag_id, run_id, {"running", "success", "failed"}, timeout=120)
    say(f"  {setup.long_tasks} catch-up tasks running ({setup.long_intervals} intervals each); sampling real-time runs")
    samples = sample_realtime(server, setup, first_k=first_k)
    spans = []
    for dag_id, run_id in runs.items():
        if server.wait_for_run(dag_id, run_id, timeout=900) != "success":
            raise CorrectnessError(
                f"{dag_id} catch-up ended failed:\n{server.task_log(dag_id, run_id, 'load')[-4000:]}"
            )
        ti = task_instance(server, dag_id, run_id)
        spans.append((ti["start_date"], ti["end_date"]))
    # The stretch while all of them ran (REST timestamps share one format, so they sort as text).
    start, end = max(s for s, _e in spans), min(e for _s, e in spans)
    return {"samples": samples, "during": during(samples, start, end)}


def build_dags(setup: Setup) -> dict[str, str]:
    """One DAG file per role: the catch-ups in the pool at priority 1, the controls and real-time outside it."""
    catch_up_pool = {"pool": POOL, "priority_weight": 1}
    batched = {"catch_up": True, "catch_up_budget": dt.timedelta(hours=1)}
    last_backfill = setup.window(setup.backfill_intervals - 1)[1]
    roles: dict[str, tuple[dt.datetime, dict[str, Any]]] = {
        "catchup": (
            setup.window(setup.catch_up_intervals)[1],
            {**catch_up_pool, **batched, "catch_up_max_intervals": setup.catch_up_intervals},
        ),
        "backfill": (last_backfill, catch_up_pool),
        "control": (last_backfill, {"priority_weight": 10}),
        "realtime": (setup.window(setup.hours())[1], {"priority_weight": 10}),
    }
    for i in range(setup.long_tasks):
        roles[f"long{i}"] = (
            setup.window(setup.long_intervals)[1],
            {**batched, "priority_weight": 10, "catch_up_max_intervals": setup.long_intervals},
        )
    return {
        f"{setup.dag(role)}.py": dag_file(
            dag_id=setup.dag(role),
            source=setup.source,
            destination=setup.dests[role],
            start=setup.t0,
            end=end,
            max_active_runs=4 if role in ("backfill", "control") else 16,
            task_kwargs={**kwargs, "table_prefix": setup.prefix, "pipeline": role},
        )
        for role, (end, kwargs) in roles.items()
    }


def summarize(label: str, samples: list[dict[str, Any]], baseline: list[dict[str, Any]] | None = None) -> str:
    delays = [s["delay"] for s in samples]
    line = f"{label:<38}: {describe(delays)}"
    if baseline is None:
        return line
    base = [s["delay"] for s in baseline]
    median, base_median = statistics.median(delays), statistics.median(base)
    return (
        f"{line}\n{'':<40}vs baseline: median x{median / base_median:.2f} ({median - base_median:+.2f} s),"
        f" max x{max(delays) / max(base):.2f} ({max(delays) - max(base):+.2f} s)"
    )


def check_all(engine: Any, setup: Setup, results: dict[str, dict[str, Any]]) -> list[str]:
    """Every destination against the source rows of the intervals its runs processed."""
    hours: dict[str, list[int]] = {
        "catchup": list(range(setup.catch_up_intervals)),
        "backfill": results["backfill"]["done_hours"],
        "control": results.get("control", {}).get("done_hours", []),
        "realtime": [setup.realtime_hour(k) for k in range(len(results) * setup.samples)],
    }
    for i in range(setup.long_tasks):
        hours[f"long{i}"] = list(range(setup.long_intervals)) if "long" in results else []
    return [
        problem
        for role, done in hours.items()
        for problem in check_destination(engine, setup.dests[role], setup.source, [setup.window(h) for h in done])
    ]


def report(setup: Setup, results: dict[str, dict[str, Any]], problems: list[str]) -> None:
    baseline = results["baseline"]["samples"]
    labels = {
        "batched": f"batched catch-up, {setup.catch_up_intervals} intervals",
        "backfill": f"backfill catch-up, {setup.backfill_intervals} runs",
        "control": "control: backfill, no pool, same prio",
        "long": f"control: {setup.long_tasks} long tasks, no pool",
    }
    lines = [
        "",
        f"== real-time start delay (task start - run queued_at), {setup.samples} runs every {setup.every:.0f} s ==",
        summarize("baseline (no catch-up)", baseline),
    ]
    for phase, label in labels.items():
        if phase not in results:
            continue
        result = results[phase]
        lines.append(summarize(label, result["samples"], baseline))
        if "busy" in result:
            lines.append(f"{'':<40}{result['busy']} backfill runs still queued or running after the last sample")
        else:
            lines.append(f"{'':<40}{len(result['during'])}/{setup.samples} runs were queued while the catch-up ran")
    under_catch_up = results["batched"]["during"] + results["backfill"]["during"]
    base_worst = max(s["delay"] for s in baseline)
    if under_catch_up:
        worst = max(s["delay"] for s in under_catch_up)
        lines.append(
            f"bound supported: with catch-up in pool {POOL} at priority_weight 1, all {len(under_catch_up)} real-time"
            f" runs queued during a catch-up started within {math.ceil(worst)} s of being queued (baseline worst"
            f" {base_worst:.1f} s; catch-up added at most {max(0.0, worst - base_worst):.1f} s to the worst case)"
        )
    short = incomplete_phases(setup, results)
    if short:
        lines.append(
            f"NOT MEASURED IN FULL: in {', '.join(short)} the catch-up ended before the real-time samples did; "
            "raise --catch-up-intervals / --long-intervals (or --rows) so it outlasts the sampling"
        )
    lines.append(
        "destinations: " + ("; ".join(problems) if problems else "exact (every interval that ran, exactly once)")
    )
    print("\n".join(lines), flush=True)


def incomplete_phases(setup: Setup, results: dict[str, dict[str, Any]]) -> list[str]:
    """Catch-up phases in which some real-time samples were queued after the catch-up had ended."""
    return [phase for phase, result in results.items() if "during" in result and len(result["during"]) < setup.samples]


def measure(server: AirflowServer, setup: Setup, controls: bool) -> dict[str, dict[str, Any]]:
    """The phases in order; each one's real-time runs use their own source hours."""
    results: dict[str, dict[str, Any]] = {}
    server.api("POST", "/pools", json={"name": POOL, "slots": 1, "description": "airflow-selfheal catch-up"})
    say(f"phase 1, baseline: {setup.samples} real-time runs every {setup.every:.0f} s, nothing else running")
    results["baseline"] = {"samples": sample_realtime(server, setup, first_k=0)}
    say(f"phase 2, batched catch-up of {setup.catch_up_intervals} intervals in pool {POOL} (1 slot)")
    results["batched"] = phase_batched(server, setup)
    say(f"phase 3, backfill catch-up ({setup.backfill_intervals} runs, pool {setup.backfill_pool_slots} slots)")
    server.api(
        "PATCH",
        f"/pools/{POOL}",
        json={"pool": POOL, "slots": setup.backfill_pool_slots, "include_deferred": False},
        params={"update_mask": "slots"},
    )
    results["backfill"] = phase_backfill(server, setup, "backfill", first_k=2 * setup.samples)
    if controls:
        say("phase 4, control: the same backfill in the default pool at the real-time task's priority")
        results["control"] = phase_backfill(server, setup, "control", first_k=3 * setup.samples)
        say(f"phase 5, control: {setup.long_tasks} batched catch-up tasks in the default pool, real-time priority")
        results["long"] = phase_long_tasks(server, setup, first_k=4 * setup.samples)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--catch-up-intervals",
        type=int,
        default=4000,
        help="hours the batched catch-up fills (default 4000: it must outlast the sampling)",
    )
    parser.add_argument("--backfill-intervals", type=int, default=200, help="runs the backfill creates")
    parser.add_argument(
        "--long-intervals", type=int, default=2000, help="hours each long control task fills (default 2000)"
    )
    parser.add_argument("--rows", type=int, default=1000, help="rows per interval (default 1000)")
    parser.add_argument("--samples", type=int, default=6, help="real-time runs per phase (default 6)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between real-time runs (default 10)")
    parser.add_argument("--no-control", action="store_true", help="skip phases 4 and 5 (the controls)")
    parser.add_argument("--backfill-pool-slots", type=int, default=3, help="catch-up pool slots during the backfill")
    args = parser.parse_args(argv)

    suffix = uuid.uuid4().hex[:8]
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    setup = Setup(
        catch_up_intervals=args.catch_up_intervals,
        backfill_intervals=args.backfill_intervals,
        long_intervals=args.long_intervals,
        long_tasks=0 if args.no_control else int(EXECUTOR_SLOTS),
        rows=args.rows,
        samples=args.samples,
        every=args.every,
        backfill_pool_slots=args.backfill_pool_slots,
        t0=now - (args.catch_up_intervals + 100) * HOUR,
        suffix=suffix,
    )
    if max(setup.backfill_intervals, setup.long_intervals) > setup.catch_up_intervals:
        parser.error("--backfill-intervals and --long-intervals must not exceed --catch-up-intervals (shared hours)")
    engine = pg_engine()
    scratch = Scratch(engine)
    setup.source = scratch.table(f"fair_src_{suffix}")
    roles = ["catchup", "backfill", "control", "realtime", *(f"long{i}" for i in range(setup.long_tasks))]
    setup.dests = {role: scratch.table(f"fair_{role}_{suffix}") for role in roles}
    setup.prefix = scratch.prefix(f"fair{suffix}_")

    def run() -> int:
        say(f"source: {setup.hours()} hours x {setup.rows} rows")
        create_source(engine, setup.source, setup.t0, setup.hours(), setup.rows)
        for name in setup.dests.values():
            create_destination(engine, name)
        with running_airflow() as server:
            write_dags(server, build_dags(setup))
            results = measure(server, setup, controls=not args.no_control)
        problems = check_all(engine, setup, results)
        report(setup, results, problems)
        if problems:
            return 1
        return 2 if incomplete_phases(setup, results) else 0

    return exit_status(run, scratch)


if __name__ == "__main__":
    sys.exit(main())
