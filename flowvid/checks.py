"""Checks of values users give, and the wording of what differs between a recorded setting and the current
one, shared by the modules that take them."""

from __future__ import annotations

import argparse
import json
import math
import unicodedata
from numbers import Integral, Real
from typing import Any, Iterable, Mapping

import torch


def is_count(value: Any) -> bool:
    """An int that is not a bool (``True`` is never meant as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer of any integer type (numpy's too) that is not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """A ValueError unless ``value`` is an int >= ``minimum``: 2.5 layers or ``True`` steps are typos that
    would otherwise be truncated or read as 1. A plain int, as it is kept in checkpoints' hyperparameters
    (which load without numpy types)."""
    if not (is_count(value) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def is_positive_number(value: Any) -> bool:
    """A finite real number > 0 that is not a bool: NaN fails ``> 0`` but infinity passes it."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_positive(name: str, value: Any) -> None:
    """A ValueError unless ``value`` is a finite number > 0 (``is_positive_number``): NaN or infinity turns
    the first step's numbers into NaN."""
    if not is_positive_number(value):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace and invisible format characters (Unicode category
    Cf: zero-width spaces and joiners, byte-order marks), as text pasted from web pages may hold."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``(name, tensor)`` pairs that holds NaN or inf."""
    return next((name for name, tensor in tensors
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


_ABSENT = object()


def differences(there: Mapping[str, Any], here: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """``"name ('a' there, 'b' here), patch_size (1 there, 2 here)"``: the keys whose values differ, "there"
    being the recorded side (shards, a checkpoint, an export) and "here" the current one; "" when none differ.

    ``keys`` are the keys looked at, in the order shown (all keys of both, sorted, by default). Strings are
    quoted, other values shown plainly, and a key that one side lacks is shown as ``absent`` there.
    """
    looked_at = sorted(there.keys() | here.keys()) if keys is None else keys
    return ", ".join(f"{key} ({_shown(there, key)} there, {_shown(here, key)} here)" for key in looked_at
                     if there.get(key, _ABSENT) != here.get(key, _ABSENT))


def _shown(values: Mapping[str, Any], key: str) -> str:
    # Quotes tell the string "1" from the number 1; a missing key must not read as the value None.
    if key not in values:
        return "absent"
    value = values[key]
    return repr(value) if isinstance(value, str) else str(value)


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object of arguments, such as ``'{"patch_size": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 2}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
