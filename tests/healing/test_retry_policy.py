"""TransientOnlyRetryPolicy: its decisions, its JSON form, and a DAG using it through Airflow's real serializer."""

from __future__ import annotations

import json
import statistics
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import RetryAction, RetryPolicy

from airflow_selfheal.exceptions import TransientError
from airflow_selfheal.healing.retry_policy import TransientOnlyRetryPolicy


class VendorQuotaExceeded(Exception):
    """Stands in for a vendor SDK's error."""


# --- decisions ------------------------------------------------------------------------------------------------------


def test_permanent_error_fails_at_once_and_says_why() -> None:
    decision = TransientOnlyRetryPolicy().evaluate(ValueError("amount 'abc'"), try_number=1, max_tries=5)
    assert decision.action is RetryAction.FAIL
    assert decision.retry_delay is None
    assert decision.reason is not None
    assert decision.reason.startswith("ValueError is permanent")
    assert decision.reason.endswith("retrying cannot help")


def test_transient_error_retries_with_full_jitter_from_the_try_number() -> None:
    policy = TransientOnlyRetryPolicy(initial_delay=10, multiplier=2, max_delay=1000)
    for try_number, ceiling in [(1, 10.0), (2, 20.0), (4, 80.0)]:
        delays = []
        for _ in range(400):
            decision = policy.evaluate(ConnectionResetError("reset by peer"), try_number=try_number, max_tries=5)
            assert decision.action is RetryAction.RETRY
            assert decision.retry_delay is not None
            delays.append(decision.retry_delay.total_seconds())
        assert min(delays) >= 0 and max(delays) <= ceiling
        # Uniform over [0, ceiling]: the mean is ceiling/2 (standard error about 1.5% of the ceiling here).
        assert statistics.fmean(delays) == pytest.approx(ceiling / 2, rel=0.15)
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling


def test_delay_is_capped_by_max_delay() -> None:
    policy = TransientOnlyRetryPolicy(initial_delay=60, multiplier=3, max_delay=90)
    assert policy.delay_ceiling(1) == 60
    assert policy.delay_ceiling(2) == 90
    assert policy.delay_ceiling(500) == 90
    for _ in range(50):
        decision = policy.evaluate(TimeoutError(), try_number=30, max_tries=40)
        assert decision.retry_delay is not None and decision.retry_delay <= timedelta(seconds=90)


def test_reason_names_the_error_and_the_plan() -> None:
    policy = TransientOnlyRetryPolicy(initial_delay=5, max_delay=5)
    reason = policy.evaluate(TransientError("upstream 503"), try_number=2, max_tries=3).reason
    assert reason is not None
    assert reason.startswith("TransientError is transient: raised as TransientError; retry 2 of 3 in ")
    assert reason.endswith("s (full jitter up to 5s)")
    spent = policy.evaluate(TransientError("upstream 503"), try_number=4, max_tries=3).reason
    assert spent is not None and spent.endswith("but all 3 retries are used up")


def test_user_rules_by_class_and_dotted_path() -> None:
    policy = TransientOnlyRetryPolicy(
        transient=[VendorQuotaExceeded, "json.JSONDecodeError"], permanent=["builtins.ConnectionAbortedError"]
    )
    assert policy.transient == (f"{__name__}.VendorQuotaExceeded", "json.JSONDecodeError")
    assert policy.evaluate(VendorQuotaExceeded(), 1, 3).action is RetryAction.RETRY
    assert policy.evaluate(json.JSONDecodeError("x", "{", 0), 1, 3).action is RetryAction.RETRY
    assert policy.evaluate(ConnectionAbortedError(), 1, 3).action is RetryAction.FAIL  # beats the built-in
    assert policy.evaluate(ConnectionResetError(), 1, 3).action is RetryAction.RETRY


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"transient": [lambda e: True]}, TypeError, r"transient\[0\] is a predicate"),
        ({"permanent": ["NoDots"]}, ValueError, r"permanent\[0\] must be a dotted class path"),
        ({"initial_delay": -1}, ValueError, "initial_delay must be"),
        ({"multiplier": 0}, ValueError, "multiplier must be"),
        ({"max_delay": "long"}, ValueError, "max_delay must be"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        TransientOnlyRetryPolicy(**kwargs)


def test_local_classes_are_refused_at_construction() -> None:
    class LocalError(Exception):
        pass

    with pytest.raises(ValueError, match=r"transient\[0\] .*defined inside a function"):
        TransientOnlyRetryPolicy(transient=[LocalError])


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        TransientOnlyRetryPolicy(["builtins.KeyError"])  # type: ignore[misc]


# --- the policy's own JSON form -------------------------------------------------------------------------------------


def test_serialize_round_trips_through_json() -> None:
    policy = TransientOnlyRetryPolicy(
        transient=[VendorQuotaExceeded], permanent=["builtins.ConnectionAbortedError"], initial_delay=2, max_delay=30
    )
    data = json.loads(json.dumps(policy.serialize()))
    assert data["__type"] == "airflow_selfheal.healing.retry_policy.TransientOnlyRetryPolicy"
    restored = TransientOnlyRetryPolicy.deserialize(data)
    assert isinstance(restored, RetryPolicy)
    assert restored == policy
    assert repr(restored) == repr(policy) and "0x" not in repr(policy)
    for error in (VendorQuotaExceeded(), ConnectionAbortedError(), KeyError("k")):
        assert restored.evaluate(error, 1, 3).action is policy.evaluate(error, 1, 3).action


def test_deserialize_rejects_other_versions() -> None:
    data = TransientOnlyRetryPolicy().serialize() | {"__version": 99}
    with pytest.raises(ValueError, match="__version"):
        TransientOnlyRetryPolicy.deserialize(data)


# --- a DAG file using the policy, parsed and serialized by Airflow -------------------------------------------------

DAG_FILE = textwrap.dedent(
    """
    from __future__ import annotations

    import datetime as dt

    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG, task

    from airflow_selfheal.healing.retry_policy import TransientOnlyRetryPolicy

    POLICY = TransientOnlyRetryPolicy(
        transient=["json.JSONDecodeError"], permanent=[ConnectionAbortedError], initial_delay=5, max_delay=120
    )

    with DAG(
        "selfheal_retry_policy",
        schedule=None,
        start_date=dt.datetime(2024, 1, 1),
        default_args={"retries": 2, "retry_policy": POLICY},
    ):

        @task(retries=4, retry_policy=POLICY)
        def load():
            return 1

        @task
        def per_shard(shard):
            return shard

        load()
        per_shard.override(retries=1, retry_policy=POLICY).expand(shard=[1, 2])
        PythonOperator(task_id="inherits_default_args", python_callable=lambda: 1)
    """
)
EXPECTED = TransientOnlyRetryPolicy(
    transient=["json.JSONDecodeError"], permanent=["builtins.ConnectionAbortedError"], initial_delay=5, max_delay=120
)


def _parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse the DAG file the way the task runner does before it runs a task (BundleDagBag)."""
    from airflow.dag_processing.dagbag import BundleDagBag

    dag_file = tmp_path / "selfheal_retry_policy.py"
    dag_file.write_text(DAG_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))  # BundleDagBag would add it to sys.path for good
    bag = BundleDagBag(
        dag_folder=str(dag_file), safe_mode=False, load_op_links=False, bundle_path=tmp_path, bundle_name="tests"
    )
    assert bag.import_errors == {}
    return bag.dags["selfheal_retry_policy"]


def test_parsed_tasks_carry_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dag = _parse(tmp_path, monkeypatch)
    for task in dag.tasks:
        assert task.retry_policy == EXPECTED, task.task_id
        assert task.has_retry_policy
        decision = task.retry_policy.evaluate(ConnectionAbortedError("abort"), try_number=1, max_tries=2)
        assert decision.action is RetryAction.FAIL


def test_dag_serialization_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    encoded = DagSerialization.to_dict(_parse(tmp_path, monkeypatch))
    text = json.dumps(encoded)
    # Airflow 3.3 stores a has_retry_policy flag, never the object (no repr, no memory address).
    assert "TransientOnlyRetryPolicy" not in text and " at 0x" not in text
    tasks = {t["__var"]["task_id"]: t["__var"] for t in encoded["dag"]["tasks"]}
    assert tasks["load"]["has_retry_policy"] is True
    assert tasks["inherits_default_args"]["has_retry_policy"] is True
    assert tasks["per_shard"]["partial_kwargs"]["has_retry_policy"] is True
    assert encoded["dag"]["default_args"]["__var"]["has_retry_policy"] is True

    restored = DagSerialization.from_dict(json.loads(text))
    assert {t.task_id: t.has_retry_policy for t in restored.tasks} == dict.fromkeys(tasks, True)
    assert restored.get_task("load").retries == 4


def test_serialized_dag_is_identical_across_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A policy that leaked into the serialized DAG as a repr would make every parse a new DAG version.
    from airflow.serialization.serialized_objects import DagSerialization

    first = json.dumps(DagSerialization.to_dict(_parse(tmp_path, monkeypatch)), sort_keys=True)
    second = json.dumps(DagSerialization.to_dict(_parse(tmp_path, monkeypatch)), sort_keys=True)
    assert first == second
