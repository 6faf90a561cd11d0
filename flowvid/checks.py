"""Checks of values users give, shared by the modules that take them."""

from __future__ import annotations

import argparse
import json
import unicodedata
from typing import Any, Iterable

import torch


def is_count(value: Any) -> bool:
    """An int that is not a bool (``True`` is never meant as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace and invisible format characters (Unicode category
    Cf: zero-width spaces and joiners, byte-order marks), as text pasted from web pages may hold."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``(name, tensor)`` pairs that holds NaN or inf."""
    return next((name for name, tensor in tensors
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object of arguments, such as ``'{"patch_size": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 2}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
