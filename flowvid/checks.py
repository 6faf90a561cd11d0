"""Checks of values users give, shared by the modules that take them."""

from __future__ import annotations

from typing import Any


def is_count(value: Any) -> bool:
    """An int that is not a bool (``True`` is never meant as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)
