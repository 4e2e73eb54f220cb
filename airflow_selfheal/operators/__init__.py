"""Operators of airflow-selfheal."""
