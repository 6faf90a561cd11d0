"""Constructor arguments given on the command line as JSON (``--codec-args``, ``--extractor-args``, ...).

They are checked against the constructor's signature before it is called, so that a misspelt or
missing argument is one line naming the object, the argument and the ones it takes, not a TypeError
from inside the constructor, and so that it stops the run before anything is written.
"""

from __future__ import annotations

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
    check_arguments(f"{registry.kind} {name!r}", registry.get(name), arguments, option)
