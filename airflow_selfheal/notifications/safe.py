"""Call user notifiers (any Airflow ``BaseNotifier`` or plain callable) so that a failing one never fails a task."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Notifier = Callable[[Any], Any]
"""A ``BaseNotifier`` instance or any callable taking the context."""


def notify_safely(notifiers: Iterable[Notifier], context: Mapping[str, Any], *, what: str = "notification") -> int:
    """
    Call every notifier with ``context``; log (never raise) the ones that fail.

    A ``BaseNotifier`` is called like Airflow calls it in ``on_*_callback`` lists (``notifier(context)``),
    so its ``template_fields`` are rendered against the context before its ``notify`` runs. Rendering
    overwrites the notifier's fields, so a shallow copy is rendered and the user's templates survive
    for the next notification from the same process.

    :param notifiers: notifiers or callables, called in order.
    :param context: the Airflow context (or any mapping) handed to each notifier; each gets its own copy.
    :param what: what is being notified, for the log.
    :return: how many notifiers succeeded.
    """
    delivered = 0
    for notifier in notifiers:
        try:
            _fresh(notifier)(dict(context))
        except Exception:
            log.warning("Notifier %r failed to send %s; carrying on", notifier, what, exc_info=True)
        else:
            delivered += 1
    return delivered


def _fresh(notifier: Notifier) -> Notifier:
    from airflow.sdk import BaseNotifier

    if isinstance(notifier, BaseNotifier):
        return copy.copy(notifier)
    return notifier
