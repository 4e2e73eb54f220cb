"""Runs the demo DAG over twelve hours with dag.test() on SQLite, then reruns three of them, and reports."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".demo"
HOURS = 12
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def prepare_environment() -> None:
    HOME.mkdir(exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(HOME / "airflow")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{HOME / 'airflow' / 'airflow.db'}"
    os.environ["AIRFLOW_CONN_SELFHEAL_DEFAULT"] = json.dumps(
        {"conn_type": "sqlite", "host": str(HOME / "warehouse.db")}
    )
    os.environ["AIRFLOW_CONN_SELFHEAL_DEMO_SOURCE"] = json.dumps(
        {"conn_type": "sqlite", "host": str(HOME / "source.db")}
    )
    for name in ("warehouse.db", "source.db"):
        (HOME / name).unlink(missing_ok=True)
    (HOME / "airflow").mkdir(exist_ok=True)
    print("== airflow db migrate (metadata on SQLite)")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    # dag.test() only runs DAGs that are serialized in the metadata database.
    subprocess.run([sys.executable, "-m", "airflow", "dags", "reserialize"], check=True, stdout=subprocess.DEVNULL)


def create_tables() -> None:
    import sqlalchemy as sa

    from airflow_selfheal.engine.sources import sql_engine

    source = sql_engine("selfheal_demo_source")
    with source.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE raw_orders (id INTEGER PRIMARY KEY, ordered_at TIMESTAMP, amount_text TEXT)")
        rows = []
        for hour in range(HOURS):
            for minute in range(0, 60, 3):
                order_id = hour * 100 + minute
                amount = "N/A" if order_id in (106, 412, 930) else f"{(order_id % 97) + 0.5:.2f}"
                ordered_at = (START + dt.timedelta(hours=hour, minutes=minute)).replace(tzinfo=None)
                rows.append({"id": order_id, "ordered_at": ordered_at, "amount_text": amount})
        conn.execute(sa.text("INSERT INTO raw_orders VALUES (:id, :ordered_at, :amount_text)"), rows)
    md = sa.MetaData()
    sa.Table(
        "orders",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ordered_at", sa.DateTime),
        sa.Column("amount", sa.Numeric(12, 2)),
    )
    sa.Table(
        "fx_rates",
        md,
        sa.Column("currency", sa.String(3), primary_key=True),
        sa.Column("hour", sa.DateTime, primary_key=True),
        sa.Column("rate", sa.Float),
    )
    md.create_all(sql_engine("selfheal_default"))


def main() -> int:
    prepare_environment()
    sys.path.insert(0, str(ROOT / "dags"))
    create_tables()
    import logging

    logging.getLogger("airflow").setLevel(logging.WARNING)
    from selfheal_demo import dag  # type: ignore[import-not-found]

    from airflow_selfheal.hooks.checkpoint import CheckpointHook
    from airflow_selfheal.hooks.dead_letter import DeadLetterHook
    from airflow_selfheal.hooks.heal_events import HealEventHook

    runs = [START + dt.timedelta(hours=h + 1) for h in range(HOURS)] + [
        START + dt.timedelta(hours=h) for h in (2, 5, 9)
    ]
    print(f"== running {len(runs)} DAG runs with dag.test() ({HOURS} hours, then 3 reruns)")
    failed = 0
    for logical_date in runs:
        state = dag.test(logical_date=logical_date).state
        failed += state != "success"
        print(f"   run {logical_date.isoformat()}: {state}")

    ledger, letters, events = CheckpointHook(), DeadLetterHook(), HealEventHook()
    print("\n== what self-healing did")
    for pipeline in ledger.pipelines():
        entries = ledger.entries(pipeline)
        done = [e for e in entries if e.status == "done"]
        print(
            f"{pipeline}: {len(done)}/{len(entries)} intervals done, watermark {ledger.watermark(pipeline)}, "
            f"{sum(e.rows_written or 0 for e in done)} rows, versions of 02:00: "
            f"{[(v.version, v.reason, v.checksum) for v in ledger.versions(pipeline, entries[1].interval)]}"
        )
    for letter in letters.list_letters():
        print(
            f"dead letter #{letter.id} {letter.pipeline} key={letter.record_key} stage={letter.stage} "
            f"{letter.error_class}: {letter.error_message}"
        )
    kinds: dict[str, int] = {}
    for event in events.list_events():
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    print(f"heal events: {kinds}")
    print(f"\nstate tables and destination: {HOME / 'warehouse.db'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
