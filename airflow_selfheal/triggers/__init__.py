"""Triggers of airflow-selfheal (they run in the triggerer)."""

from __future__ import annotations
