"""The installed distribution registers as an Airflow provider, as the real ``airflow`` CLI sees it."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from airflow_selfheal import __version__
from airflow_selfheal.get_provider_info import get_provider_info
from tests.airflow_harness import AIRFLOW


def airflow_json(*args: str) -> Any:
    """Run ``airflow <args> -o json`` in a subprocess with the session's environment (SQLite AIRFLOW_HOME)."""
    result = subprocess.run(
        [AIRFLOW, *args, "-o", "json"], env=dict(os.environ), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"airflow {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    # Warnings may precede the document on stdout; the JSON starts at the first line that opens a list.
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("["))
    return json.loads("\n".join(lines[start:]))


def test_providers_list_shows_airflow_selfheal_with_its_version() -> None:
    providers = {p["package_name"]: p for p in airflow_json("providers", "list")}
    assert "airflow-selfheal" in providers, f"not registered; Airflow sees {sorted(providers)}"
    assert providers["airflow-selfheal"]["version"] == __version__


def test_connection_types_are_registered_with_their_hooks() -> None:
    hooks = {h["connection_type"]: h for h in airflow_json("providers", "hooks")}
    declared = get_provider_info()["connection-types"]
    assert declared, "the provider declares no connection type"
    for conn_type in declared:
        registered = hooks.get(conn_type["connection-type"])
        assert registered is not None, f"connection type {conn_type['connection-type']!r} is not registered"
        assert registered["package_name"] == "airflow-selfheal"
        assert registered["class"] == conn_type["hook-class-name"]
        assert registered["hook_name"] == conn_type["hook-name"]
    assert hooks["selfheal_airflow_api"]["class"] == "airflow_selfheal.hooks.airflow_api.AirflowApiHook"


def test_config_defaults_of_the_provider_reach_airflow_config() -> None:
    result = subprocess.run(
        [AIRFLOW, "config", "get-value", "selfheal", "table_prefix"],
        env={k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__SELFHEAL__")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "selfheal_"
