"""Notification helpers: reporting that degrades but never fails a task."""

from __future__ import annotations
