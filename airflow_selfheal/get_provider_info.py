"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_selfheal import __version__


def get_provider_info() -> dict[str, Any]:
    """Describe the provider the way official providers do; ``package-name`` must match the distribution."""
    return {
        "package-name": "airflow-selfheal",
        "name": "Self-heal",
        "description": "Self-healing batch pipelines: checkpoint ledger, dead letters, classified retries, "
        "circuit breakers, idempotent versioned writes and catch-up.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Self-heal",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Self-heal",
                "python-modules": [
                    "airflow_selfheal.hooks.state_store",
                    "airflow_selfheal.hooks.checkpoint",
                    "airflow_selfheal.hooks.dead_letter",
                    "airflow_selfheal.hooks.heal_events",
                    "airflow_selfheal.hooks.airflow_api",
                    "airflow_selfheal.hooks.circuit_breaker",
                ],
            }
        ],
        "sensors": [{"integration-name": "Self-heal", "python-modules": ["airflow_selfheal.sensors.circuit_breaker"]}],
        "triggers": [
            {"integration-name": "Self-heal", "python-modules": ["airflow_selfheal.triggers.circuit_breaker"]}
        ],
        "operators": [
            {
                "integration-name": "Self-heal",
                "python-modules": [
                    "airflow_selfheal.operators.interval",
                    "airflow_selfheal.operators.interval_transfer",
                    "airflow_selfheal.operators.selfheal_task",
                    "airflow_selfheal.operators.catch_up",
                    "airflow_selfheal.operators.redrive",
                ],
            }
        ],
        "task-decorators": [
            {"class-name": "airflow_selfheal.decorators.selfheal.selfheal_task", "name": "selfheal"},
        ],
        "connection-types": [
            {
                "connection-type": "selfheal_airflow_api",
                "hook-class-name": "airflow_selfheal.hooks.airflow_api.AirflowApiHook",
                "hook-name": "Airflow REST API (self-heal)",
            }
        ],
        "cli": ["airflow_selfheal.cli.definition.get_selfheal_cli_commands"],
        "config": {
            "selfheal": {
                "description": "Where airflow-selfheal keeps its state.",
                "options": {
                    "conn_id": {
                        "description": "Connection id of the SQL database that holds the state tables.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "selfheal_default",
                        "default": "selfheal_default",
                    },
                    "table_prefix": {
                        "description": "Prefix of every state table name (letters, digits, underscores).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "selfheal_",
                        "default": "selfheal_",
                    },
                    "schema": {
                        "description": "Schema (PostgreSQL) or database (MySQL) of the state tables; "
                        "empty for the connection's default.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "selfheal",
                        "default": "",
                    },
                },
            }
        },
    }
