"""Sensors of airflow-selfheal."""

from __future__ import annotations
