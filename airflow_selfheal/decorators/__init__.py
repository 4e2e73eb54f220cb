"""TaskFlow decorators of airflow-selfheal."""
