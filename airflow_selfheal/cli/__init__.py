"""
The ``airflow selfheal`` command group: inspect and steer the state store from a shell.

Airflow loads it through the provider's ``cli`` entry (see :mod:`airflow_selfheal.cli.definition`).
"""

from __future__ import annotations
