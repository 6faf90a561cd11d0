"""The ``flowvid`` command.

``flowvid fit|validate|test|predict --config recipe.yaml`` is LightningCLI; the other verbs are small
programs of their own (``flowvid plugins``, ``flowvid data ...``). Plugins are loaded before any
parsing, so YAML can name a plugin class by its short name.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from flowvid.registry import REGISTRIES, load_plugins

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, without a traceback."""


def run_lightning(argv: list[str]) -> int:
    """LightningCLI with ``--resume auto|none|PATH`` and self-describing checkpoints."""
    from flowvid.lit.cli_support import main as lightning_main

    # Lightning relaunches ``sys.argv`` for multi-process runs; passing the same list again only warns.
    return lightning_main(None if argv == sys.argv[1:] else argv)


def list_plugins(argv: list[str]) -> int:
    """Print every registered block, codec, text encoder, sampler, FVD extractor and dataset."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flowvid plugins")
    for column in ("kind", "name", "class", "package", "version"):
        table.add_column(column)
    for kind, registry in REGISTRIES.items():
        for entry in registry:
            table.add_row(kind, entry.name, entry.class_path, entry.package, entry.version)
    Console(width=160).print(table)
    return 0


def _verb(module: str, function: str = "main") -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    return run


VERBS: dict[str, Callable[[list[str]], int]] = {
    "plugins": list_plugins,
    "data": _verb("data_tools.cli"),
    "generate": _verb("flowvid.generate"),
    "score": _verb("flowvid.score"),
    "export": _verb("flowvid.export"),
    "convert": _verb("flowvid.convert"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        verbs = ", ".join([*LIGHTNING_VERBS, *VERBS])
        print(f"usage: flowvid {{{verbs}}} ...")
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    load_plugins()
    try:
        if verb in LIGHTNING_VERBS:
            return run_lightning(argv)
        if verb not in VERBS:
            raise UserError(f"unknown command {verb!r}; choose one of {', '.join([*LIGHTNING_VERBS, *VERBS])}")
        return VERBS[verb](rest)
    except UserError as err:
        print(f"flowvid {verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Verbs raise flowvid.cli.UserError; run that module's main, not a second copy named __main__.
    from flowvid.cli import main as flowvid_main

    sys.exit(flowvid_main())
