"""Turn any Python value into bounded, faithful JSON for the dead-letter table."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
_MAX_DEPTH = 20


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "value": value}


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """
    Convert ``value`` into JSON types, tagging what JSON cannot express so it reads back faithfully.

    datetimes, dates, times, Decimals, UUIDs, bytes, sets and tuples become ``{"__type__", "value"}``
    objects; dataclasses and objects with ``__dict__`` become their fields; anything else (including
    objects without ``__dict__``) falls back to ``repr``, so storing never fails.
    """
    if _depth > _MAX_DEPTH:
        return _tag("repr", repr(value)[:1000])
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else _tag("float", repr(value))
    if isinstance(value, dt.datetime):
        return _tag("datetime", value.isoformat())
    if isinstance(value, dt.date):
        return _tag("date", value.isoformat())
    if isinstance(value, dt.time):
        return _tag("time", value.isoformat())
    if isinstance(value, dt.timedelta):
        return _tag("timedelta", value.total_seconds())
    if isinstance(value, decimal.Decimal):
        return _tag("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return _tag("uuid", str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _tag("bytes", base64.b64encode(bytes(value)).decode("ascii"))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, _depth + 1) for v in value]
        return _tag("set", sorted(items, key=lambda item: json.dumps(item, sort_keys=True)))
    if isinstance(value, tuple):
        return _tag("tuple", [to_jsonable(v, _depth + 1) for v in value])
    if isinstance(value, list):
        return [to_jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _tag(type(value).__qualname__, to_jsonable(dataclasses.asdict(value), _depth + 1))
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return _tag(type(value).__qualname__, to_jsonable(vars(value), _depth + 1))
    return _tag("repr", repr(value))


@dataclasses.dataclass(frozen=True)
class EncodedPayload:
    """A payload ready to store: the (possibly cut) JSON text and what was lost."""

    text: str
    size_bytes: int
    sha256: str
    truncated: bool


def encode_payload(value: Any, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> EncodedPayload:
    """
    Encode ``value`` as JSON capped at ``max_bytes``.

    The hash is always of the full encoding, so two oversize payloads that differ only past the cap
    stay distinguishable. A cut payload is stored as ``{"__truncated__": true, "head": ...}`` so the
    stored text is still valid JSON.
    """
    full = json.dumps(to_jsonable(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    raw = full.encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) <= max_bytes:
        return EncodedPayload(full, len(raw), digest, False)
    head = raw[: max(0, max_bytes - 200)].decode("utf-8", errors="ignore")
    text = json.dumps({"__truncated__": True, "original_bytes": len(raw), "sha256": digest, "head": head})
    return EncodedPayload(text, len(raw), digest, True)


_DECODERS: dict[str, Any] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda v: dt.timedelta(seconds=v),
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
    "float": float,
}


def _decode_hashable(value: Any) -> Any:
    decoded = from_jsonable(value)
    return tuple(decoded) if isinstance(decoded, list) else decoded


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the tagged types; objects come back as dicts of their fields."""
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__type__", "value"}:
            kind, inner = value["__type__"], value["value"]
            if kind == "tuple":
                return tuple(from_jsonable(inner))
            if kind == "set":
                return {_decode_hashable(item) for item in inner}
            decoder = _DECODERS.get(kind)
            if decoder is not None:
                return decoder(inner)
            return from_jsonable(inner) if isinstance(inner, dict | list) else inner
        return {k: from_jsonable(v) for k, v in value.items()}
    return value


def decode_payload(text: str) -> Any:
    """Read a stored payload back into Python values (a truncated one stays a dict with its head)."""
    data = json.loads(text)
    if isinstance(data, dict) and data.get("__truncated__") is True:
        return data
    return from_jsonable(data)


def record_identity(record_key: Any, payload_sha256: str) -> str:
    """Stable identity of a failing record: its key when it has one, else its content hash."""
    if record_key is None:
        return "sha256:" + payload_sha256
    key_json = json.dumps(to_jsonable(record_key), sort_keys=True)
    return "key:" + hashlib.sha256(key_json.encode()).hexdigest()
