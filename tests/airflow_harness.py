"""
Pytest plugin: a migrated in-process Airflow (``airflow_db``) and a real Airflow stack (``airflow_server``).

``airflow_db`` (session): migrates the session's SQLite metadata database (the AIRFLOW_HOME that
tests/conftest.py sets up) and returns :class:`AirflowDb`, whose ``run_dag(dag)`` writes the DAG to
the metadata database and runs ``dag.test()``. Airflow 3.3's ``dag.test()`` refuses a DAG that was
never serialized ("the dag is not serialized"), and a DAG built inside a test is in no DAG file
that ``dag.test()`` could parse, so it has to be synced explicitly.

``airflow_server`` (session): api-server, scheduler (LocalExecutor), dag-processor and triggerer, each
in its own process group, on a fresh PostgreSQL metadata database; returns :class:`AirflowServer`.
``airflow_api_conn_id`` is the id of an Airflow connection (type ``selfheal_airflow_api``) to that
server, visible to the test process and to the tasks the server runs.

:func:`airflow_stack` is the same stack as a context manager, for scripts outside pytest (benchmarks/).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
if not Path(AIRFLOW).exists():  # a venv without its own launcher: fall back to PATH
    AIRFLOW = shutil.which("airflow") or "airflow"

API_CONN_ID = "selfheal_test_airflow_api"
ADMIN_USER = "admin"
PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = frozenset({"success", "failed"})


def _tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"<{path.name}: no log>"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- in-process dag.test() on the session's SQLite metadata database --------------------------------


class AirflowDb:
    """Helpers for ``dag.test()`` against the session's migrated SQLite metadata database."""

    def sync_dag(self, dag: Any) -> None:
        """Serialize ``dag`` into the metadata database (``dag.test()`` refuses unserialized DAGs)."""
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.dag_processing.collection import update_dag_parsing_results_in_db
        from airflow.serialization.serialized_objects import LazyDeserializedDAG
        from airflow.utils.session import create_session

        with create_session() as session:
            manager = DagBundlesManager()
            manager.sync_bundles_to_db(session=session)
            session.flush()
            bundle = next(iter(manager.get_all_dag_bundles())).name  # "dags-folder" unless configured otherwise
            update_dag_parsing_results_in_db(
                bundle, None, [LazyDeserializedDAG.from_dag(dag)], {}, None, set(), session=session
            )

    def run_dag(self, dag: Any, **kwargs: Any) -> Any:
        """Sync ``dag`` and run it once with ``dag.test(**kwargs)``; returns the finished DagRun."""
        self.sync_dag(dag)
        return dag.test(**kwargs)


@pytest.fixture(scope="session")
def airflow_db() -> AirflowDb:
    """Migrate the session's SQLite metadata database once (``airflow db migrate``, about 6 s)."""
    result = subprocess.run(
        [AIRFLOW, "db", "migrate"], env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"airflow db migrate failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return AirflowDb()


# -- a real Airflow stack ---------------------------------------------------------------------------


class AirflowServerError(AssertionError):
    """The real Airflow did something a test did not expect; the message carries the log tails."""


class AirflowServer:
    """
    A running Airflow 3 stack for one test session.

    Attributes: ``base_url`` (``http://127.0.0.1:<port>``), ``host``, ``port``, ``username``,
    ``password`` (an admin of the simple auth manager), ``env`` (environment of every Airflow
    process, including the state-store connections of tests/conftest.py), ``home``, ``dags_folder``.
    """

    def __init__(self, root: Path, env: dict[str, str], port: int, password: str, metadata_db: str) -> None:
        self.root = root
        self.home = root / "home"
        self.dags_folder = root / "dags"
        self.env = env
        self.host = "127.0.0.1"
        self.port = port
        self.base_url = f"http://{self.host}:{port}"
        self.username = ADMIN_USER
        self.password = password
        self.metadata_db = metadata_db
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds: float | None = None  # measured by the fixture, for reports
        self._token: str | None = None
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        """Migrate, start the four processes and wait until the health endpoint says all are healthy."""
        self.cli("db", "migrate", timeout=300)
        for name in PROCESSES:
            log = (self.root / f"{name}.log").open("wb")
            args = [AIRFLOW, name] + (["--port", str(self.port), "--host", self.host] if name == "api-server" else [])
            # Own process group: teardown kills the whole tree (LocalExecutor workers, task supervisors).
            self.processes[name] = subprocess.Popen(
                args, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AirflowServerError(f"airflow {name} exited with {proc.returncode}\n{self.log_tail(name)}")
            try:
                health = self._client.get("/api/v2/monitor/health").json()
                last = json.dumps(health)
                components = ("metadatabase", "scheduler", "triggerer", "dag_processor")
                if all((health.get(c) or {}).get("status") == "healthy" for c in components):
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AirflowServerError(f"Airflow not healthy after {timeout:.0f}s: {last}\n{self.diagnostics()}")

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after 8 s. Safe to call twice."""
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also reaps children that outlived their leader
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.processes.clear()
        self._client.close()

    # -- debugging --------------------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 60) -> str:
        """Last lines of a process log: ``api-server``, ``scheduler``, ``dag-processor`` or ``triggerer``."""
        return _tail(self.root / f"{name}.log", lines)

    def diagnostics(self, lines: int = 40) -> str:
        """Log tails of all four processes, for assertion messages."""
        return "\n".join(self.log_tail(name, lines) for name in PROCESSES)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        """The task's log as Airflow serves it, one line per event (tracebacks come as ``error_detail``)."""
        body = self.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
        )
        lines: list[str] = []
        for message in body.get("content", []):
            if isinstance(message, str):
                lines.append(message)
                continue
            lines.append(f"{message.get('timestamp', '')} {message.get('level', '')} {message.get('event', '')}")
            for error in message.get("error_detail") or []:
                frames = [f"  {f['filename']}:{f['lineno']} in {f['name']}" for f in error.get("frames", [])[-4:]]
                lines.extend([*frames, f"  {error.get('exc_type')}: {error.get('exc_value')}"])
        return "\n".join(lines)

    # -- CLI and REST -----------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real ``airflow`` executable with the server's environment (``check`` raises on exit != 0)."""
        result = subprocess.run(
            [AIRFLOW, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AirflowServerError(
                f"airflow {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def _auth_header(self, refresh: bool = False) -> dict[str, str]:
        if self._token is None or refresh:
            response = self._client.post("/auth/token", json={"username": self.username, "password": self.password})
            if response.status_code not in (200, 201):
                raise AirflowServerError(f"login failed: {response.status_code} {response.text[:300]}")
            self._token = str(response.json()["access_token"])
        return {"Authorization": f"Bearer {self._token}"}

    def api_response(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One authenticated request to ``/api/v2{path}``; returns the raw response whatever its status."""
        url = path if path.startswith(("/api/", "/auth/")) else f"/api/v2{path}"
        for refresh in (False, True):
            response = self._client.request(
                method, url, json=json, params=params, headers={**self._auth_header(refresh), **(headers or {})}
            )
            if response.status_code != 401:
                break
        return response

    def api(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Call REST v2 (``path`` like ``/dags``); returns the decoded body, raises on a status >= 400."""
        for attempt in range(4):
            response = self.api_response(method, path, json=json, params=params)
            if response.status_code != 503 or attempt == 3:  # 503: transient database contention
                break
            time.sleep(0.5 * (attempt + 1))
        if response.status_code >= 400:
            raise AirflowServerError(f"{method} {path} -> {response.status_code}: {response.text[:1000]}")
        return response.json() if response.content else None

    # -- DAGs and runs ----------------------------------------------------------------------------

    def write_dag(self, filename: str, source: str) -> Path:
        """Write a DAG file and reserialize at once (the dag-processor would wait up to 300 s).

        Raises when the file does not import, with Airflow's import error in the message.
        """
        path = self.dags_folder / filename
        path.write_text(source)
        self.cli("dags", "reserialize")
        errors = self.api("GET", "/importErrors", params={"limit": 100}).get("import_errors", [])
        mine = [e for e in errors if Path(str(e.get("filename", ""))).name == filename]
        if mine:
            raise AirflowServerError(f"{filename} does not import:\n{mine[0].get('stack_trace')}")
        return path

    def unpause(self, dag_id: str) -> None:
        """Unpause a DAG (new DAGs start unpaused here; this is for DAGs a test paused)."""
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(
        self,
        dag_id: str,
        logical_date: dt.datetime | str | None = None,
        conf: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        data_interval: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> str:
        """Create a manual run (``POST /dags/{dag_id}/dagRuns``); returns its run id.

        :param data_interval: explicit ``(start, end)``; needs ``logical_date``. Without it Airflow infers
            the interval from the DAG's timetable (``(logical_date, logical_date)`` for ``schedule=None``).
        """
        if isinstance(logical_date, dt.datetime):
            logical_date = logical_date.isoformat()
        body: dict[str, Any] = {"logical_date": logical_date, "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        if data_interval is not None:
            body["data_interval_start"], body["data_interval_end"] = (d.isoformat() for d in data_interval)
        return str(self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of ``dag_id`` (dicts with ``dag_run_id``, ``state``, ``run_type``, ``logical_date``...)."""
        result = self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})
        return list(result["dag_runs"])

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 90.0) -> str:
        """Wait until the run is ``success`` or ``failed`` and return that state."""
        deadline = time.monotonic() + timeout
        while True:
            state = str(self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"])
            if state in TERMINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tis = [(t["task_id"], t["state"], t["try_number"]) for t in self.task_instances(dag_id, run_id)]
                raise AirflowServerError(
                    f"run {dag_id}/{run_id} still {state} after {timeout:.0f}s; tasks {tis}\n{self.diagnostics()}"
                )
            time.sleep(0.5)

    def wait_for_runs(
        self, dag_id: str, *, count: int, run_type: str | None = None, timeout: float = 120.0
    ) -> dict[str, str]:
        """Wait until ``dag_id`` has at least ``count`` runs (of ``run_type``, e.g. ``backfill``), all finished.

        Returns ``{run_id: state}`` of those runs.
        """
        deadline = time.monotonic() + timeout
        while True:
            runs = [r for r in self.runs(dag_id) if run_type is None or r["run_type"] == run_type]
            states = {str(r["dag_run_id"]): str(r["state"]) for r in runs}
            if len(states) >= count and set(states.values()) <= TERMINAL_RUN_STATES:
                return states
            if time.monotonic() > deadline:
                raise AirflowServerError(
                    f"{dag_id}: wanted {count} finished runs, have {states} after {timeout:.0f}s\n{self.diagnostics()}"
                )
            time.sleep(0.5)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Task instances of one run: dicts with ``task_id``, ``state``, ``try_number``, ``map_index``..."""
        result = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return list(result["task_instances"])


def _postgres_admin_url() -> Any:
    from sqlalchemy.engine import make_url

    return make_url(os.environ.get("SELFHEAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))


def _postgres_admin(url: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, dbname=url.database,
        autocommit=True, connect_timeout=5,
    )  # fmt: skip


def _server_env(root: Path, port: int, password: str, metadata_url: str) -> dict[str, str]:
    home = root / "home"
    api_conn = {
        "conn_type": "selfheal_airflow_api",
        "host": "127.0.0.1",
        "port": port,
        "schema": "http",
        "login": ADMIN_USER,
        "password": password,
    }
    overrides = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        # Scheduler (JWT signer) and api-server (JWT checker) must share the secret.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(root / "task-logs"),
        # Defaults 8793/8794 would clash with anything else on the machine.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        f"AIRFLOW_CONN_{API_CONN_ID.upper()}": json.dumps(api_conn),
    }
    return {**os.environ, **overrides}


class MetadataDatabaseUnavailable(AirflowServerError):
    """PostgreSQL for the metadata database cannot be reached."""


@contextlib.contextmanager
def airflow_stack() -> Iterator[AirflowServer]:
    """
    Start a real Airflow (api-server, scheduler, dag-processor, triggerer) on a fresh PostgreSQL
    metadata database; stop it and drop everything it created on exit. ~25 s to start.

    Usable outside pytest (benchmarks/). ``AIRFLOW_CONN_SELFHEAL_TEST_AIRFLOW_API`` is set in this
    process while the stack runs, so the caller can reach it through that connection too.

    :raises MetadataDatabaseUnavailable: PostgreSQL is not reachable.
    :raises AirflowServerError: the stack did not become healthy.
    """
    url = _postgres_admin_url()
    try:
        admin = _postgres_admin(url)
    except Exception as exc:
        raise MetadataDatabaseUnavailable(f"PostgreSQL for the metadata database is not reachable ({exc})") from exc
    metadata_db = f"selfheal_meta_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{metadata_db}"')
    try:
        import psycopg2  # noqa: F401  # Airflow's long-standing PostgreSQL driver

        driver = "postgresql+psycopg2"
    except ImportError:
        driver = "postgresql+psycopg"
    metadata_url = url.set(drivername=driver, database=metadata_db).render_as_string(hide_password=False)

    root = Path(tempfile.mkdtemp(prefix="selfheal-airflow-"))
    (root / "home").mkdir()
    (root / "dags").mkdir()
    port = _free_port()
    password = secrets.token_urlsafe(12)
    (root / "passwords.json").write_text(json.dumps({ADMIN_USER: password}))
    env = _server_env(root, port, password, metadata_url)
    conn_var = f"AIRFLOW_CONN_{API_CONN_ID.upper()}"
    os.environ[conn_var] = env[conn_var]  # the calling process talks to the same server
    server = AirflowServer(root, env, port, password, metadata_db)

    def cleanup() -> None:
        server.stop()
        os.environ.pop(conn_var, None)
        with contextlib.suppress(Exception), _postgres_admin(url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{metadata_db}" WITH (FORCE)')
        if not os.environ.get("SELFHEAL_KEEP_AIRFLOW_HOME"):
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)  # also when the process dies before the normal exit
    try:
        started = time.monotonic()
        server.start()
        server.startup_seconds = time.monotonic() - started
        yield server
    finally:
        cleanup()
        atexit.unregister(cleanup)


@pytest.fixture(scope="session")
def airflow_server() -> Iterator[AirflowServer]:
    """A real Airflow (api-server, scheduler, dag-processor, triggerer) on PostgreSQL; ~25 s to start."""
    stack = airflow_stack()
    try:
        server = stack.__enter__()
    except Exception as exc:
        pytest.fail(f"could not start a real Airflow: {exc}", pytrace=False)
    try:
        yield server
    finally:
        stack.__exit__(None, None, None)


@pytest.fixture(scope="session")
def airflow_api_conn_id(airflow_server: AirflowServer) -> str:
    """Id of a ``selfheal_airflow_api`` connection to ``airflow_server`` (also set in the tasks' environment)."""
    return API_CONN_ID


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m "not airflow_server"` skips these too
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the real server, even where its author forgot the marker."""
    for item in items:
        if "airflow_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.airflow_server)
