"""Constructor arguments given on the command line as JSON (``--codec-args``, ``--extractor-args``, ...).

They are checked against the constructor's signature before it is called, so that a misspelt or
missing argument is one line naming the object, the argument and the ones it takes, not a TypeError
from inside the constructor, and so that it stops the run before anything is written.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any, Callable

from flowvid.registry import Registry

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object of arguments, such as ``'{"patch_size": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 2}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_registered(registry: Registry, name: str, arguments: dict[str, Any], option: str) -> Any:
    """``registry``'s ``name`` built with ``arguments``, which the command line gave as ``option``.

    Raises a KeyError for an unknown name and a ValueError for arguments the constructor does not take.
    """
    check_registered_arguments(registry, name, arguments, option)
    return registry.get(name)(**arguments)


def check_registered_arguments(registry: Registry, name: str, arguments: dict[str, Any], option: str) -> None:
    """Raise a KeyError for a name ``registry`` does not know, a ValueError for arguments it would refuse."""
    check_arguments(f"{registry.kind} {name!r}", registry.get(name), arguments, option)


def check_arguments(what: str, factory: Callable[..., Any], arguments: dict[str, Any], option: str) -> None:
    """Raise a ValueError unless ``factory`` takes ``arguments`` by name, saying which it does take."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to check against (a builtin): the call itself will tell
        return
    named = [p for p in parameters if p.kind in _NAMED]
    accepted = ", ".join(p.name for p in named) or "none"
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unknown = [key for key in arguments if key not in {p.name for p in named}]
    if unknown and not takes_any:
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))} (in {option}); "
                         f"its arguments are: {accepted}")
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in arguments]
    if missing:
        raise ValueError(f"{what} needs the argument {', '.join(map(repr, missing))}: give it in {option} "
                         f"(its arguments are: {accepted})")
