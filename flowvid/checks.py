"""Checks of values users give, shared by the modules that take them."""

from __future__ import annotations

import argparse
import json
from typing import Any


def is_count(value: Any) -> bool:
    """An int that is not a bool (``True`` is never meant as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object of arguments, such as ``'{"patch_size": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 2}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
