"""Portable table definitions and value encoding for the state store (SQLAlchemy Core only)."""
