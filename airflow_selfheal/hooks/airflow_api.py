"""A small client of Airflow's public REST API (v2), for what task code may not do directly."""

from __future__ import annotations

import logging
import time
from functools import cached_property
from typing import Any

import httpx
from airflow.sdk import BaseHook

from airflow_selfheal.exceptions import SelfHealError

log = logging.getLogger(__name__)


class AirflowApiError(SelfHealError):
    """The Airflow REST API refused a request; the message carries the status and the body."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AirflowApiHook(BaseHook):
    """
    Calls Airflow's REST API with a JWT from ``POST /auth/token``.

    Airflow 3 forbids task code to open the metadata database, so pausing a DAG or creating a
    backfill goes through this API like any other client.

    Connection (type ``selfheal_airflow_api``): host and port of the api-server, ``schema`` http or
    https, login and password of an Airflow user.

    :param airflow_api_conn_id: the connection to use.
    :param timeout: seconds per request.
    :param retries: how often a 503 (e.g. "database is locked" on SQLite) or a connection error is retried.
    """

    conn_name_attr = "airflow_api_conn_id"
    default_conn_name = "selfheal_airflow_api_default"
    conn_type = "selfheal_airflow_api"
    hook_name = "Airflow REST API (self-heal)"

    def __init__(
        self, airflow_api_conn_id: str = default_conn_name, *, timeout: float = 30.0, retries: int = 3
    ) -> None:
        super().__init__()
        self.airflow_api_conn_id = airflow_api_conn_id
        self.timeout = timeout
        self.retries = retries

    @cached_property
    def base_url(self) -> str:
        """``scheme://host:port`` of the api-server."""
        conn = self.get_connection(self.airflow_api_conn_id)
        scheme = conn.schema or "http"
        host = conn.host or "localhost"
        if "://" in host:
            return host.rstrip("/")
        return f"{scheme}://{host}:{conn.port or 8080}"

    @cached_property
    def _token(self) -> str:
        conn = self.get_connection(self.airflow_api_conn_id)
        response = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": conn.login, "password": conn.password},
            timeout=self.timeout,
        )
        if response.status_code not in (200, 201):
            raise AirflowApiError(
                f"Airflow API login as {conn.login!r} at {self.base_url} failed: "
                f"{response.status_code} {response.text[:300]}"
            )
        return str(response.json()["access_token"])

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Send one request to ``/api/v2{path}``; returns the decoded JSON body (or ``None``)."""
        url = f"{self.base_url}/api/v2{path}"
        for attempt in range(1, self.retries + 2):
            try:
                response = httpx.request(
                    method,
                    url,
                    json=json,
                    params=params,
                    timeout=self.timeout,
                    headers={"Authorization": f"Bearer {self._token}"},
                )
            except httpx.TransportError:
                if attempt > self.retries:
                    raise
                log.warning("Airflow API %s %s unreachable (attempt %s); retrying", method, path, attempt)
                time.sleep(attempt)
                continue
            if response.status_code == 503 and attempt <= self.retries:
                log.warning("Airflow API %s %s answered 503 (attempt %s); retrying", method, path, attempt)
                time.sleep(attempt)
                continue
            if response.status_code >= 400:
                raise AirflowApiError(
                    f"{method} {path} -> {response.status_code}: {response.text[:500]}",
                    status_code=response.status_code,
                )
            return response.json() if response.content else None
        raise AssertionError("unreachable")  # pragma: no cover

    def set_paused(self, dag_id: str, paused: bool) -> None:
        """Pause or unpause a DAG."""
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def create_backfill(
        self,
        dag_id: str,
        *,
        from_date: str,
        to_date: str,
        reprocess_behavior: str = "failed",
        max_active_runs: int = 1,
        run_backwards: bool = False,
        dag_run_conf: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a backfill (both dates inclusive, ISO 8601); returns Airflow's backfill object."""
        body = {
            "dag_id": dag_id,
            "from_date": from_date,
            "to_date": to_date,
            "reprocess_behavior": reprocess_behavior,
            "max_active_runs": max_active_runs,
            "run_backwards": run_backwards,
            "dag_run_conf": dag_run_conf or {},
        }
        result: dict[str, Any] = self.request("POST", "/backfills", json=body)
        return result

    def list_backfills(self, dag_id: str) -> list[dict[str, Any]]:
        """Backfills of ``dag_id`` (Airflow requires the dag id)."""
        result = self.request("GET", "/backfills", params={"dag_id": dag_id})
        return list(result.get("backfills", [])) if result else []
