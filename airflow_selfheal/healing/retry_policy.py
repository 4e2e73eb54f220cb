"""
An Airflow 3.3 ``retry_policy`` that spends task retries on transient errors only.

Attach it to any task; ``retries`` still caps how often Airflow retries (a policy cannot add tries)::

    from airflow_selfheal.healing.retry_policy import TransientOnlyRetryPolicy

    POLICY = TransientOnlyRetryPolicy(transient=["vendor_sdk.errors.RateLimited"], max_delay=900)

    @task(retries=6, retry_policy=POLICY)
    def load(): ...

    SQLExecuteQueryOperator(task_id="merge", sql="...", retries=6, retry_policy=POLICY)

The worker calls :meth:`TransientOnlyRetryPolicy.evaluate` with the exception the task raised. Airflow 3.3's
DAG serializer stores only ``has_retry_policy: true`` for a task (never the policy object); the worker gets
the live policy by parsing the DAG file again, so the policy must be built at module level of the DAG file.
:meth:`serialize` / :meth:`deserialize` still implement ``RetryPolicy``'s JSON contract, so the policy keeps
working should a later Airflow store it, and so a policy can be kept in a Variable or a config file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import RetryDecision, RetryPolicy

from airflow_selfheal.healing.classify import PERMANENT, ErrorClassifier
from airflow_selfheal.healing.retry import RetrySettings

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["TransientOnlyRetryPolicy"]

_REASON_LIMIT = 500  # Airflow stores at most 500 characters of a retry reason
_FORMAT_VERSION = 1


class TransientOnlyRetryPolicy(RetryPolicy):
    """
    Fail at once on permanent errors; retry transient ones after a full-jitter exponential delay.

    The delay after try ``n`` (1-based) is ``uniform(0, min(max_delay, initial_delay * multiplier ** (n - 1)))``
    seconds: the same formula as :func:`airflow_selfheal.healing.retry.full_jitter_wait`, so tasks that failed
    together do not all come back at the same second.

    :param transient: extra transient rules, as exception classes or dotted class paths (kept as dotted
        paths so the policy serializes; predicates are refused for that reason).
    :param permanent: extra permanent rules, same forms; they beat every built-in rule.
    :param initial_delay: ceiling of the first retry delay, in seconds.
    :param multiplier: growth of the ceiling per try (>= 1).
    :param max_delay: cap of the ceiling, in seconds.
    """

    def __init__(
        self,
        *,
        transient: Sequence[type[BaseException] | str] = (),
        permanent: Sequence[type[BaseException] | str] = (),
        initial_delay: float = 30.0,
        multiplier: float = 2.0,
        max_delay: float = 1800.0,
    ) -> None:
        rules = ErrorClassifier(transient=transient, permanent=permanent)
        for argument, given in (("transient", rules.transient_rules), ("permanent", rules.permanent_rules)):
            for index, rule in enumerate(given):
                if not isinstance(rule, (str, type)):
                    raise TypeError(
                        f"{argument}[{index}] is a predicate; a retry policy must serialize, "
                        "so use an exception class or a dotted class path"
                    )
        # Fails here, at DAG parse time, when a class cannot be named by an importable path.
        paths = rules.serialize()
        self.classifier = ErrorClassifier(transient=paths["transient"], permanent=paths["permanent"])
        self.settings = RetrySettings(initial_delay=initial_delay, multiplier=multiplier, max_delay=max_delay)
        self._rng = random.Random()

    @property
    def transient(self) -> tuple[str, ...]:
        """The user's transient rules, as dotted paths."""
        return tuple(str(rule) for rule in self.classifier.transient_rules)

    @property
    def permanent(self) -> tuple[str, ...]:
        """The user's permanent rules, as dotted paths."""
        return tuple(str(rule) for rule in self.classifier.permanent_rules)

    def delay_ceiling(self, try_number: int) -> float:
        """Upper bound of the delay drawn after try ``try_number``."""
        return self.settings.delay_ceiling(max(1, try_number))

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Context | None = None,
    ) -> RetryDecision:
        """
        Decide for one failed try.

        :param exception: what the task raised.
        :param try_number: the try that failed (1-based); drives the backoff.
        :param max_tries: the task's maximum tries (Airflow enforces it; only used in the reason).
        :param context: the task context (unused: the decision depends on the error alone).
        """
        why = self.classifier.explain(exception)
        if self.classifier.classify(exception) == PERMANENT:
            return RetryDecision.fail(reason=f"{why}; retrying cannot help"[:_REASON_LIMIT])
        ceiling = self.delay_ceiling(try_number)
        delay = self._rng.uniform(0.0, ceiling)
        # Airflow retries while try_number <= max_tries (max_tries counts retries, not tries).
        if try_number <= max_tries:
            when = f"retry {try_number} of {max_tries} in {delay:.1f}s (full jitter up to {ceiling:g}s)"
        else:
            when = f"but all {max_tries} retries are used up"
        return RetryDecision.retry(delay=timedelta(seconds=delay), reason=f"{why}; {when}"[:_REASON_LIMIT])

    # -- serialization (RetryPolicy's JSON contract) ----------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        """JSON-able dict; ``__type`` is the importable class path that :meth:`deserialize` expects."""
        return {
            "__type": f"{type(self).__module__}.{type(self).__qualname__}",
            "__version": _FORMAT_VERSION,
            "classifier": self.classifier.serialize(),
            "initial_delay": self.settings.initial_delay,
            "multiplier": self.settings.multiplier,
            "max_delay": self.settings.max_delay,
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> TransientOnlyRetryPolicy:
        """Rebuild a policy from :meth:`serialize` output."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict made by {cls.__name__}.serialize(), got {type(data).__name__}")
        version = data.get("__version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"data['__version'] must be {_FORMAT_VERSION}, got {version!r}")
        classifier = ErrorClassifier.deserialize(data.get("classifier", {}))
        return cls(
            transient=[str(rule) for rule in classifier.transient_rules],
            permanent=[str(rule) for rule in classifier.permanent_rules],
            initial_delay=data.get("initial_delay", 30.0),
            multiplier=data.get("multiplier", 2.0),
            max_delay=data.get("max_delay", 1800.0),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransientOnlyRetryPolicy) and self.serialize() == other.serialize()

    def __hash__(self) -> int:
        return hash((self.classifier, self.settings))

    def __repr__(self) -> str:
        # Deterministic (no memory address): anything that prints the policy stays stable between parses.
        return (
            f"{type(self).__name__}(transient={list(self.transient)!r}, permanent={list(self.permanent)!r}, "
            f"initial_delay={self.settings.initial_delay:g}, multiplier={self.settings.multiplier:g}, "
            f"max_delay={self.settings.max_delay:g})"
        )
