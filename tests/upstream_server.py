"""
A stand-in for a flaky upstream API: a threaded HTTP server on 127.0.0.1 that a test switches between
``up``, ``down`` (every request answers 503) and stopped (connection refused), and that counts the
requests it receives, so a test can prove that an open circuit breaker kept tasks away from it.

``GET /<anything>?start=<iso>&end=<iso>`` answers (when up) with :func:`records_for` of that window
as JSON; ``ts`` values are ISO strings without a time zone (UTC).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

RECORDS_PER_HOUR = 5
_STEP = dt.timedelta(hours=1) / RECORDS_PER_HOUR


def records_for(start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    """The upstream's records of ``[start, end)``: ``RECORDS_PER_HOUR`` an hour, ids unique across hours."""
    records = []
    ts = start
    while ts < end:
        minutes = int(ts.timestamp()) // 60
        ts_naive = ts.astimezone(dt.UTC).replace(tzinfo=None)
        records.append({"id": minutes, "ts": ts_naive.isoformat(), "amount": minutes % 97})
        ts += _STEP
    return records


class UpstreamServer:
    """
    The fake dependency. ``calls`` counts every request that reached it, per path.

    :param port: port on 127.0.0.1 (default: a free one); a stopped server restarts on the same port.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "up"
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def up(self) -> None:
        """Answer with records (starting the server if it was stopped)."""
        self.mode = "up"
        self.start()

    def down(self) -> None:
        """Answer every request with 503 Service Unavailable (still counting it)."""
        self.mode = "down"
        self.start()

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="upstream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the socket: callers now get 'connection refused'."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def _count(self, path: str) -> str:
        with self._lock:
            self.calls[path] += 1
        return self.mode


def _handler_for(upstream: UpstreamServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server dispatches to
            parts = urlsplit(self.path)
            if upstream._count(parts.path) != "up":
                self._send(503, {"error": "upstream is down"})
                return
            query = parse_qs(parts.query)
            try:
                start = dt.datetime.fromisoformat(query["start"][0])
                end = dt.datetime.fromisoformat(query["end"][0])
            except (KeyError, ValueError) as exc:
                self._send(400, {"error": f"start and end must be ISO datetimes: {exc}"})
                return
            self._send(200, records_for(start, end))

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows stderr
            pass

    return Handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(mode: str = "up") -> Iterator[UpstreamServer]:
    """Generator for a pytest fixture: a started server in ``mode`` (``up`` or ``down``), stopped afterwards."""
    upstream = UpstreamServer()
    upstream.up() if mode == "up" else upstream.down()
    try:
        yield upstream
    finally:
        upstream.stop()
