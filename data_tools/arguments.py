"""Constructor arguments given on the command line as JSON (``--codec-args``, ``--extractor-args``, ...).

They are checked against the constructor's signature before it is called, so that a misspelt or
missing argument, or a value of another type than its annotation (``"0.6"`` for a float), is one line
naming the object, the argument and what it takes, not a TypeError from inside the constructor, and so
that it stops the run before anything is written.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any

from flowvid.registry import Registry, check_arguments


def build_registered(registry: Registry, name: str, arguments: dict[str, Any], option: str) -> Any:
    """``registry``'s ``name`` built with ``arguments``, which the command line gave as ``option``.

    Raises a KeyError for an unknown name and a ValueError for arguments the constructor does not take.
    """
    check_registered_arguments(registry, name, arguments, option)
    return registry.get(name)(**arguments)


def check_registered_arguments(registry: Registry, name: str, arguments: dict[str, Any], option: str) -> None:
    """Raise a KeyError for a name ``registry`` does not know, a ValueError for arguments it would refuse."""
    what = f"{registry.kind} {name!r}"
    factory = registry.get(name)
    check_arguments(what, factory, arguments, option)
    check_argument_types(what, factory, arguments, option)


def check_argument_types(what: str, factory: Any, arguments: dict[str, Any], option: str) -> None:
    """Raise a ValueError naming the first argument whose JSON value does not fit ``factory``'s annotation.

    Annotations this cannot judge (a class of the constructor's own, a name that does not resolve) let
    any value through: the constructor itself then decides."""
    annotations = _annotations(factory)
    for key, value in arguments.items():
        expected = annotations.get(key, inspect.Parameter.empty)
        if expected is not inspect.Parameter.empty and not fits(value, expected):
            raise ValueError(f"{what} takes {key!r} as {type_name(expected)}, got {type(value).__name__} "
                             f"{value!r} (in {option})")


def _annotations(factory: Any) -> dict[str, Any]:
    try:  # eval_str: modules with ``from __future__ import annotations`` hold them as strings
        parameters = inspect.signature(factory, eval_str=True).parameters.values()
    except Exception:  # noqa: BLE001 - no signature, or an annotation naming what its module cannot resolve
        return {}
    return {parameter.name: parameter.annotation for parameter in parameters}


def fits(value: Any, expected: Any) -> bool:
    """Whether the JSON value ``value`` is one of type ``expected``; True for types this cannot judge."""
    if expected is Any or isinstance(expected, (str, typing.TypeVar)):
        return True
    if expected is None or expected is type(None):
        return value is None
    origin, members = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, member) for member in members)
    if origin is typing.Literal:
        return value in members
    if origin is typing.Annotated:
        return fits(value, members[0])
    if origin is not None:
        return _fits_generic(value, origin, members)
    return _fits_class(value, expected)


def _fits_class(value: Any, expected: Any) -> bool:
    if expected is float:  # an integer is a float, as in Python's own typing (a JSON 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected in (bool, str, list, dict):
        return isinstance(value, expected)
    if expected in (tuple, collections.abc.Sequence):
        return isinstance(value, (list, str) if expected is collections.abc.Sequence else list)
    if expected is collections.abc.Mapping:
        return isinstance(value, dict)
    return True  # a class JSON cannot hold (a path, a dtype): the constructor converts or refuses it


def _fits_generic(value: Any, origin: Any, members: tuple[Any, ...]) -> bool:
    """``list[int]``, ``tuple[int, int]``, ``dict[str, float]``, ``Sequence[str]`` ...: the container and its items."""
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list):
            return False
        if origin is tuple and members and members[-1] is not Ellipsis:
            return len(value) == len(members) and all(map(fits, value, members))
        return not members or all(fits(item, members[0]) for item in value)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return len(members) != 2 or all(fits(item, members[1]) for item in value.values())
    return True


def type_name(expected: Any) -> str:
    """``float``, ``str | None``, ``list[int]``: an annotation as it is written."""
    if isinstance(expected, type) and not typing.get_args(expected):
        return expected.__name__
    return str(expected).replace("typing.", "").replace("NoneType", "None")
