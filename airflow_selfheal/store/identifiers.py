"""Validation of user-supplied SQL identifiers (table prefixes, schemas, column and table names)."""

from __future__ import annotations

import re

from airflow_selfheal.exceptions import InvalidIdentifierError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# PostgreSQL truncates at 63 and MySQL at 64 characters; stay below both.
MAX_IDENTIFIER_LENGTH = 63


def validate_identifier(value: str, *, argument: str, allow_empty: bool = False, max_length: int = 63) -> str:
    """
    Return ``value`` if it is a plain identifier, else raise :class:`InvalidIdentifierError`.

    Only ``[A-Za-z_][A-Za-z0-9_]*`` passes, so nothing a user configures can smuggle SQL into a
    statement, and quoting rules never differ between dialects.

    :param value: the identifier to check.
    :param argument: the name of the argument it came from, used in the error message.
    :param allow_empty: accept the empty string (e.g. an empty table prefix).
    :param max_length: longest identifier accepted.
    """
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"{argument} must be a string, got {type(value).__name__}")
    if value == "" and allow_empty:
        return value
    if not _IDENTIFIER.match(value):
        raise InvalidIdentifierError(
            f"{argument}={value!r} is not a plain SQL identifier: use letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    if len(value) > max_length:
        raise InvalidIdentifierError(f"{argument}={value!r} is longer than {max_length} characters")
    return value


def validate_dotted_table(value: str, *, argument: str) -> tuple[str | None, str]:
    """Split ``schema.table`` (or ``table``) and validate both parts; returns ``(schema, table)``."""
    if not isinstance(value, str) or not value:
        raise InvalidIdentifierError(f"{argument} must be a non-empty table name")
    parts = value.split(".")
    if len(parts) > 2:
        raise InvalidIdentifierError(f"{argument}={value!r} must be 'table' or 'schema.table'")
    for part in parts:
        validate_identifier(part, argument=argument)
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
