"""
Decide whether an error is worth retrying: TRANSIENT (it may pass) or PERMANENT (retrying cannot help).

Order of precedence, first match wins:

1. Never retried, whatever the rules say: exceptions that are not ``Exception`` (``KeyboardInterrupt``,
   ``SystemExit``, ``asyncio.CancelledError``) and Airflow's control-flow signals (skip, fail, defer,
   reschedule, task timeout).
2. The user's ``permanent`` rules, then the user's ``transient`` rules.
3. :class:`~airflow_selfheal.exceptions.PermanentError` / :class:`~airflow_selfheal.exceptions.TransientError`
   raised by user code.
4. Built-in knowledge of databases, HTTP and the network (:mod:`airflow_selfheal.healing.builtin_rules`).
5. Otherwise PERMANENT: an unknown error is most likely a bug, and a bug must fail fast and loud.

Steps 2 to 4 look at the error and then along its chain: a SQLAlchemy error's driver error (``.orig``), then
``__cause__`` (``raise X from e``) or, when there is none, ``__context__`` (raised while handling another).
For the built-ins, the first error of the chain they have an opinion on decides, so a wrapper such as
``AirflowException(...) from ConnectionError(...)`` is transient while a ``ValueError`` is permanent at once.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from airflow_selfheal.exceptions import PermanentError, TransientError
from airflow_selfheal.healing.builtin_rules import PERMANENT, TRANSIENT, Verdict, builtin_verdict, class_paths

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CLASSIFIER", "PERMANENT", "TRANSIENT", "ErrorClassifier", "Rule"]

Rule: TypeAlias = type[BaseException] | str | Callable[[BaseException], bool]
"""An exception class, the dotted path of one (``"pkg.module.Error"``), or a predicate on the exception."""

_DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_CHAIN_LIMIT = 16  # chains are short; the limit only guards against pathological self-references
_AIRFLOW_SIGNALS = {
    "AirflowSkipException",
    "AirflowFailException",
    "AirflowRescheduleException",
    "AirflowSensorTimeout",
    "AirflowTaskTimeout",
    "AirflowTaskTerminated",
    "TaskDeferred",
    "DagRunTriggerException",
}
_UNRESOLVED = object()


def describe_rule(rule: Rule) -> str:
    """A rule as text: the dotted path of a class or path rule, the qualified name of a predicate."""
    if isinstance(rule, str):
        return rule
    if isinstance(rule, type):
        return f"{rule.__module__}.{rule.__qualname__}"
    return getattr(rule, "__qualname__", None) or repr(rule)


def _validate_rules(rules: Sequence[Rule] | None, argument: str) -> tuple[Rule, ...]:
    if rules is None:
        return ()
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"{argument} must be a list of rules, got {type(rules).__name__} {rules!r}")
    for index, rule in enumerate(rules):
        where = f"{argument}[{index}]"
        if isinstance(rule, str):
            if not _DOTTED_PATH.match(rule):
                raise ValueError(f"{where} must be a dotted class path such as 'pkg.module.Error', got {rule!r}")
        elif isinstance(rule, type):
            if not issubclass(rule, BaseException):
                raise TypeError(f"{where} must be an exception class, got class {rule.__qualname__}")
        elif not callable(rule):
            raise TypeError(
                f"{where} must be an exception class, a dotted path or a predicate, got {type(rule).__name__}"
            )
    return tuple(rules)


def error_chain(error: BaseException) -> list[BaseException]:
    """The error, then what it wraps: SQLAlchemy's ``.orig``, else ``__cause__``, else ``__context__``."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(chain) < _CHAIN_LIMIT:
        chain.append(current)
        seen.add(id(current))
        orig = getattr(current, "orig", None) if "sqlalchemy.exc.DBAPIError" in class_paths(current) else None
        if isinstance(orig, BaseException) and id(orig) not in seen:
            current = orig
        elif current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    return chain


def _signal(error: BaseException) -> str | None:
    """Why this error must never be retried, or ``None`` for an ordinary error."""
    if not isinstance(error, Exception):
        return f"{type(error).__name__} is an interrupt, exit or cancellation, never retried"
    for cls in type(error).__mro__:
        if cls.__name__ in _AIRFLOW_SIGNALS and cls.__module__.startswith("airflow"):
            return f"{cls.__name__} is an Airflow control-flow signal, never retried"
    return None


class ErrorClassifier:
    """
    Classifies exceptions as :data:`TRANSIENT` or :data:`PERMANENT` (see the module docstring for the order).

    :param transient: rules for errors the user knows pass with time (e.g. a vendor's ``RateLimited``).
    :param permanent: rules for errors retrying cannot fix; they beat every other rule, so a user can veto a
        built-in (e.g. make HTTP 503 from one broken upstream permanent).

    A rule is an exception class (``isinstance``), a dotted class path (matched against the error's class
    hierarchy by name, else imported on first use) or a predicate ``error -> bool``. Predicates work in
    process but cannot be serialized.
    """

    def __init__(self, *, transient: Sequence[Rule] | None = (), permanent: Sequence[Rule] | None = ()) -> None:
        self.transient_rules = _validate_rules(transient, "transient")
        self.permanent_rules = _validate_rules(permanent, "permanent")
        self._imported: dict[str, Any] = {}

    def classify(self, error: BaseException) -> str:
        """Return :data:`TRANSIENT` or :data:`PERMANENT`."""
        return self._decide(error)[0]

    def is_transient(self, error: BaseException) -> bool:
        """Whether retrying ``error`` can help."""
        return self._decide(error)[0] == TRANSIENT

    def explain(self, error: BaseException) -> str:
        """One line for logs and hints, e.g. ``"OperationalError is transient: PostgreSQL SQLSTATE 40P01: ..."``."""
        verdict, reason = self._decide(error)
        return " ".join(f"{type(error).__name__} is {verdict}: {reason}".split())

    # -- decision -----------------------------------------------------------------------------------------------

    def _decide(self, error: BaseException) -> Verdict:
        if not isinstance(error, BaseException):
            raise TypeError(f"error must be an exception, got {type(error).__name__}")
        signal = _signal(error)
        if signal is not None:
            return PERMANENT, signal
        chain = error_chain(error)
        for verdict, rules in ((PERMANENT, self.permanent_rules), (TRANSIENT, self.transient_rules)):
            for rule in rules:
                for depth, link in enumerate(chain):
                    if self._matches(rule, link):
                        return verdict, f"user {verdict} rule {describe_rule(rule)} matched{_via(depth, link)}"
        for depth, link in enumerate(chain):
            if isinstance(link, PermanentError):
                return PERMANENT, f"raised as PermanentError{_via(depth, link)}"
            if isinstance(link, TransientError):
                return TRANSIENT, f"raised as TransientError{_via(depth, link)}"
        for depth, link in enumerate(chain):
            built_in = builtin_verdict(link)
            if built_in is not None:
                return built_in[0], f"{built_in[1]}{_via(depth, link)}"
        return PERMANENT, "no rule recognises it; unknown errors are permanent so bugs fail fast"

    def _matches(self, rule: Rule, error: BaseException) -> bool:
        if isinstance(rule, type):
            return isinstance(error, rule)
        if isinstance(rule, str):
            if rule in class_paths(error):
                return True
            cls = self._resolve(rule)
            return isinstance(cls, type) and isinstance(error, cls)
        try:
            return bool(rule(error))
        except Exception:
            log.warning("Classifier predicate %s raised on %s; treated as no match", describe_rule(rule), error)
            return False

    def _resolve(self, path: str) -> Any:
        # Public paths often differ from the defining module (httpx.ConnectError lives in httpx._exceptions).
        if path not in self._imported:
            module_name, _, attribute = path.rpartition(".")
            try:
                self._imported[path] = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError):
                log.warning("Classifier rule %s cannot be imported here; it will not match", path)
                self._imported[path] = _UNRESOLVED
        return self._imported[path]

    # -- serialization --------------------------------------------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        """JSON-able form; raises ``ValueError`` naming the first rule that cannot serialize (a predicate)."""
        return {
            "transient": [_serialize_rule(rule, f"transient[{i}]") for i, rule in enumerate(self.transient_rules)],
            "permanent": [_serialize_rule(rule, f"permanent[{i}]") for i, rule in enumerate(self.permanent_rules)],
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ErrorClassifier:
        """Rebuild a classifier from :meth:`serialize` output."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict made by ErrorClassifier.serialize(), got {type(data).__name__}")
        unknown = set(data) - {"transient", "permanent"}
        if unknown:
            raise ValueError(f"data has unknown keys {sorted(unknown)}; expected 'transient' and 'permanent'")
        rules: dict[str, list[str]] = {}
        for key in ("transient", "permanent"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise TypeError(f"data[{key!r}] must be a list of dotted class paths, got {value!r}")
            rules[key] = value
        return cls(transient=rules["transient"], permanent=rules["permanent"])

    def _key(self) -> tuple[tuple[object, ...], tuple[object, ...]]:
        def norm(rule: Rule) -> object:
            return rule if callable(rule) and not isinstance(rule, type) else describe_rule(rule)

        return tuple(map(norm, self.transient_rules)), tuple(map(norm, self.permanent_rules))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ErrorClassifier) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        transient = [describe_rule(rule) for rule in self.transient_rules]
        permanent = [describe_rule(rule) for rule in self.permanent_rules]
        return f"ErrorClassifier(transient={transient!r}, permanent={permanent!r})"


def _serialize_rule(rule: Rule, where: str) -> str:
    if isinstance(rule, str):
        return rule
    if isinstance(rule, type):
        path = describe_rule(rule)
        if "<locals>" in path:
            raise ValueError(f"{where} ({path}) is defined inside a function and cannot be imported by path")
        return path
    raise ValueError(
        f"{where} ({describe_rule(rule)}) is a predicate and cannot be serialized; "
        "use an exception class or a dotted class path"
    )


def _via(depth: int, link: BaseException) -> str:
    return "" if depth == 0 else f" (via wrapped {type(link).__module__}.{type(link).__qualname__})"


DEFAULT_CLASSIFIER = ErrorClassifier()
"""The classifier with built-in knowledge only."""
