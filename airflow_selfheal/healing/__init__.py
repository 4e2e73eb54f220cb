"""Healing primitives: error classification, in-task retries and Airflow retry policies."""
