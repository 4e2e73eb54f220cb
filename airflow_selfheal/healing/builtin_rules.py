"""
What airflow-selfheal knows about common errors without being told: databases, HTTP and the network.

Each check looks at ONE exception and returns ``(verdict, reason)`` or ``None`` when it has no opinion; the
classifier walks the exception chain and applies user rules first. Driver classes are recognised by their
dotted class path and duck-typed attributes (``sqlstate``, ``pgcode``, ``errno``, ``args[0]``,
``response.status_code``), so no driver or HTTP library has to be installed for this module to import.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

TRANSIENT = "transient"
PERMANENT = "permanent"

Verdict = tuple[str, str]
"""``(TRANSIENT or PERMANENT, one-line reason)``."""


def class_paths(error: BaseException) -> list[str]:
    """Dotted ``module.QualName`` of every class in the error's MRO, most specific first."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__]


def _module(error: BaseException) -> str:
    return type(error).__module__ or ""


# --- PostgreSQL (psycopg 3, psycopg2, asyncpg): SQLSTATE codes -------------------------------------------------

_PG_TRANSIENT_CODES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
    "57P01": "server shutting down (admin shutdown)",
    "57P02": "server crashed (crash shutdown)",
    "57P03": "server cannot accept connections yet",
    "57014": "query canceled (statement or lock timeout)",
}
_PG_TRANSIENT_CLASSES = {"08": "connection exception", "53": "insufficient resources"}
_PG_PERMANENT_CLASSES = {
    "0A": "feature not supported",
    "22": "data exception",
    "23": "integrity constraint violation",
    "25": "invalid transaction state",
    "28": "invalid authorization",
    "2B": "dependent objects still exist",
    "3D": "invalid database name",
    "3F": "invalid schema name",
    "42": "syntax error or undefined object",
    "44": "check option violation",
    "P0": "error raised by PL/pgSQL",
    "XX": "internal error",
}
# Connection-time failures carry no SQLSTATE in psycopg; these phrases mean configuration, not weather.
_PG_PERMANENT_CONNECT_PHRASES = (
    "does not exist",
    "authentication failed",
    "pg_hba.conf",
    "permission denied",
    "invalid dsn",
    "invalid connection option",
    "invalid sslmode",
)


def _postgres(error: BaseException) -> Verdict | None:
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(code, str) and len(code) == 5:
        code = code.upper()
        if code in _PG_TRANSIENT_CODES:
            return TRANSIENT, f"PostgreSQL SQLSTATE {code}: {_PG_TRANSIENT_CODES[code]}"
        if code[:2] in _PG_TRANSIENT_CLASSES:
            return TRANSIENT, f"PostgreSQL SQLSTATE {code}: {_PG_TRANSIENT_CLASSES[code[:2]]}"
        if code[:2] in _PG_PERMANENT_CLASSES:
            return PERMANENT, f"PostgreSQL SQLSTATE {code}: {_PG_PERMANENT_CLASSES[code[:2]]}"
        return None
    message = str(error).lower()
    for phrase in _PG_PERMANENT_CONNECT_PHRASES:
        if phrase in message:
            return PERMANENT, f"PostgreSQL refused the connection setup ({phrase!r}): a configuration error"
    return None


# --- MySQL / MariaDB (MySQLdb, pymysql, mysql-connector, mariadb): error numbers --------------------------------

_MYSQL_TRANSIENT = {
    1040: "too many connections",
    1053: "server shutdown in progress",
    1159: "network read timeout",
    1161: "network write timeout",
    1205: "lock wait timeout",
    1213: "deadlock",
    1927: "connection killed",
    2002: "cannot connect (socket)",
    2003: "cannot connect (TCP)",
    2006: "server has gone away",
    2013: "lost connection during query",
    2055: "lost connection",
    3572: "lock not available (NOWAIT)",
    4031: "disconnected by the server (idle timeout)",
}
_MYSQL_PERMANENT = {
    1044: "access denied to database",
    1045: "access denied",
    1046: "no database selected",
    1048: "column cannot be null",
    1049: "unknown database",
    1050: "table already exists",
    1054: "unknown column",
    1062: "duplicate entry",
    1064: "SQL syntax error",
    1142: "command denied",
    1146: "no such table",
    1264: "value out of range",
    1364: "field has no default value",
    1366: "incorrect value for column",
    1406: "data too long",
    1451: "foreign key constraint (parent row)",
    1452: "foreign key constraint (child row)",
    1698: "access denied",
}
_MYSQL_MODULES = ("MySQLdb", "pymysql", "mysql.connector", "mariadb", "aiomysql")


def _mysql_code(error: BaseException) -> int | None:
    for candidate in (getattr(error, "errno", None), error.args[0] if error.args else None):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return None


def _mysql(error: BaseException) -> Verdict | None:
    code = _mysql_code(error)
    if code in _MYSQL_TRANSIENT:
        return TRANSIENT, f"MySQL/MariaDB error {code}: {_MYSQL_TRANSIENT[code]}"
    if code in _MYSQL_PERMANENT:
        return PERMANENT, f"MySQL/MariaDB error {code}: {_MYSQL_PERMANENT[code]}"
    return None


# --- SQLite: one OperationalError class for everything, so read the message -------------------------------------

_SQLITE_PERMANENT_PHRASES = (
    "no such ",  # table, column, function, index
    "syntax error",
    "has no column named",
    "already exists",
    "incomplete input",
    "unrecognized token",
    "readonly database",
    "not authorized",
    "unable to open database file",
)
_SQLITE_TRANSIENT_PHRASES = ("database is locked", "database table is locked", "disk i/o error")


def _sqlite(error: BaseException) -> Verdict | None:
    if "sqlite3.OperationalError" not in class_paths(error):
        return None
    message = str(error).lower()
    for phrase in _SQLITE_PERMANENT_PHRASES:
        if phrase in message:
            return PERMANENT, f"SQLite {phrase.strip()!r}: a schema or SQL error"
    for phrase in _SQLITE_TRANSIENT_PHRASES:
        if phrase in message:
            return TRANSIENT, f"SQLite {phrase!r}: another writer or the disk is busy"
    return None


# --- DB-API exception families (PEP 249), by class name -----------------------------------------------------------

# SQLAlchemy's wrappers (sqlalchemy.exc) carry the same names, so _sqlalchemy reads this table too.
_FAMILY = {
    "OperationalError": TRANSIENT,
    "IntegrityError": PERMANENT,
    "ProgrammingError": PERMANENT,
    "DataError": PERMANENT,
    "NotSupportedError": PERMANENT,
    "InternalError": PERMANENT,
    "InterfaceError": PERMANENT,
}
_CLOSED_CONNECTION_PHRASES = ("connection already closed", "connection is closed", "lost connection")


def _dbapi_family(error: BaseException) -> Verdict | None:
    for cls in type(error).__mro__:
        if cls.__module__ == "builtins":
            break
        verdict = _FAMILY.get(cls.__name__)
        if verdict is None:
            continue
        if cls.__name__ == "InterfaceError" and any(p in str(error).lower() for p in _CLOSED_CONNECTION_PHRASES):
            return TRANSIENT, "DB-API InterfaceError on a closed connection: a new connection can succeed"
        what = "operational (connection, lock or resource) error" if verdict == TRANSIENT else "error in SQL or data"
        return verdict, f"DB-API {cls.__name__}: {what}"
    return None


def dbapi_verdict(error: BaseException) -> Verdict | None:
    """Classify a driver (DB-API) exception: dialect-specific codes first, then its PEP 249 family."""
    module = _module(error)
    dialect_check: Callable[[BaseException], Verdict | None] | None = None
    if module.split(".")[0] in ("psycopg", "psycopg2", "asyncpg"):
        dialect_check = _postgres
    elif module.startswith(_MYSQL_MODULES):
        dialect_check = _mysql
    elif module.split(".")[0] == "sqlite3":
        dialect_check = _sqlite
    verdict = dialect_check(error) if dialect_check else None
    return verdict or _dbapi_family(error)


# --- SQLAlchemy wrappers -----------------------------------------------------------------------------------------


def _sqlalchemy(error: BaseException) -> Verdict | None:
    paths = class_paths(error)
    if "sqlalchemy.exc.DBAPIError" in paths:
        if getattr(error, "connection_invalidated", False):
            return TRANSIENT, "SQLAlchemy invalidated the lost connection; the pool opens a new one"
        orig = getattr(error, "orig", None)
        verdict = dbapi_verdict(orig) if isinstance(orig, BaseException) else None
        if verdict is not None:
            return verdict[0], f"{verdict[1]} (wrapped in sqlalchemy.exc.{type(error).__name__})"
        for cls in type(error).__mro__:
            hint = _FAMILY.get(cls.__name__) if cls.__module__ == "sqlalchemy.exc" else None
            if hint is not None:
                return hint, f"sqlalchemy.exc.{cls.__name__} with an unrecognised driver error"
        return None
    if "sqlalchemy.exc.DisconnectionError" in paths:
        return TRANSIENT, "SQLAlchemy detected a disconnect; the pool opens a new connection"
    if "sqlalchemy.exc.TimeoutError" in paths:
        return TRANSIENT, "SQLAlchemy pool timed out waiting for a free connection"
    return None


# --- HTTP (httpx, requests, anything with response.status_code) ---------------------------------------------------

_HTTP_TRANSPORT = {
    "httpx.TransportError",
    "requests.exceptions.ConnectionError",
    "requests.exceptions.Timeout",
    "requests.exceptions.ChunkedEncodingError",
    "urllib3.exceptions.ProtocolError",
    "urllib3.exceptions.TimeoutError",
}
# Transport errors that are really bugs in the request we built: retrying sends the same bad request.
_HTTP_LOCAL_MISTAKES = {"httpx.UnsupportedProtocol", "httpx.LocalProtocolError"}


def _status_code(error: BaseException) -> int | None:
    try:  # some libraries raise from the property when no response is attached
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
    except Exception:
        return None
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    return None


def _http(error: BaseException) -> Verdict | None:
    status = _status_code(error)
    if status is not None:
        if status in (408, 429) or status >= 500:
            return TRANSIENT, f"HTTP {status}: the server is overloaded, rate-limiting or temporarily failing"
        return PERMANENT, f"HTTP {status}: the request itself is wrong (client error)"
    paths = set(class_paths(error))
    if paths & _HTTP_LOCAL_MISTAKES:
        return PERMANENT, "HTTP client rejected the request before sending it (bad URL or protocol)"
    if paths & _HTTP_TRANSPORT:
        return TRANSIENT, "HTTP transport failure (connect, read or timeout)"
    return None


# --- Python built-ins ------------------------------------------------------------------------------------------------

_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EHOSTDOWN,
    errno.EPIPE,
}
_PERMANENT_BUILTINS: tuple[type[BaseException], ...] = (
    ValueError,  # includes UnicodeError and json.JSONDecodeError
    LookupError,  # KeyError, IndexError
    TypeError,
    AttributeError,
    NameError,
    ArithmeticError,
    AssertionError,
    NotImplementedError,
    ImportError,
    SyntaxError,
    RecursionError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _python(error: BaseException) -> Verdict | None:
    if isinstance(error, ConnectionError):
        return TRANSIENT, "network connection failed or was reset"
    if isinstance(error, TimeoutError):  # also socket.timeout and asyncio.TimeoutError
        return TRANSIENT, "operation timed out"
    if isinstance(error, socket.gaierror) and error.errno == socket.EAI_AGAIN:
        return TRANSIENT, "temporary DNS resolution failure"
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return TRANSIENT, f"network error (errno {errno.errorcode.get(error.errno or 0, error.errno)})"
    if isinstance(error, _PERMANENT_BUILTINS):
        return PERMANENT, f"{type(error).__name__} signals a bug or bad data"
    return None


_CHECKS: tuple[Callable[[BaseException], Verdict | None], ...] = (_sqlalchemy, dbapi_verdict, _http, _python)


def builtin_verdict(error: BaseException) -> Verdict | None:
    """The built-in opinion on one exception (not its chain), or ``None``."""
    for check in _CHECKS:
        verdict = check(error)
        if verdict is not None:
            return verdict
    return None
