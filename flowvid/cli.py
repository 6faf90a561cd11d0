"""The ``flowvid`` command.

``flowvid fit|validate --config recipe.yaml`` is LightningCLI (a flow needs no test or predict loop:
``generate`` and ``score`` are those); the other verbs are small programs of their own (``flowvid
plugins``, ``flowvid data ...``). Plugins are loaded before any parsing, so YAML can name a plugin
class by its bare class name in ``class_path`` (``class_path: PixelCodec``, codecs, text encoders,
data modules), and blocks and samplers by their registered short name (``deep_block: gated``);
a short name in ``class_path`` is not resolved. ``flowvid data`` reaches plugins through the registries
alone, which load them on first use, and imports only the module of the tool it runs.

Warnings are printed as ``flowvid: warning: MESSAGE``, without the file, line and source line Python
names (code of flowvid or a library, of no use at the command line); ``FLOWVID_TRACEBACK=1`` keeps
Python's format. Importing flowvid changes nothing: only the commands print warnings so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import textwrap
import warnings
from typing import Callable, Iterator

from flowvid.registry import REGISTRIES, did_you_mean, load_plugins, unread_entry_points, unread_note

#: The exit status of a command stopped by Ctrl-C: 128 + SIGINT, as a shell reports it.
CTRL_C_EXIT_STATUS = 128 + signal.SIGINT

LIGHTNING_VERBS = ("fit", "validate")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, without a traceback."""


def console_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """``warnings.formatwarning`` for the commands: the message alone, after the program's name."""
    return f"flowvid: warning: {message}\n"


@contextlib.contextmanager
def warnings_for_the_console() -> Iterator[None]:
    """Within it, warnings print as ``console_warning`` says, unless ``FLOWVID_TRACEBACK`` is set; the
    format in place before comes back after. Also a decorator, for a command's ``main``."""
    if os.environ.get("FLOWVID_TRACEBACK"):
        yield
        return
    python_format = warnings.formatwarning
    warnings.formatwarning = console_warning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def run_lightning(argv: list[str]) -> int:
    """LightningCLI with ``--resume auto|none|PATH`` and self-describing checkpoints."""
    from flowvid.lit.cli_support import main as lightning_main

    # Lightning relaunches ``sys.argv`` for multi-process runs; passing the same list again only warns.
    return lightning_main(None if argv == sys.argv[1:] else argv)


def list_plugins(argv: list[str]) -> int:
    """Print every registered block, codec, text encoder, sampler, FVD extractor and dataset."""
    if argv in (["-h"], ["--help"]):
        print("usage: flowvid plugins\n\nList every registered block, permutation, codec, text encoder, sampler, "
              "FVD extractor and dataset, with its class, package and version.\n")
        print(exit_statuses("the plugins are listed"))
        return 0
    if argv:
        raise UserError(f"plugins takes no arguments, got {' '.join(argv)}")
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="flowvid plugins")
    for column in ("kind", "name", "class", "package", "version"):
        table.add_column(column)
    for kind, registry in REGISTRIES.items():
        for entry in registry:
            table.add_row(kind, entry.name, entry.class_path, entry.package, entry.version)
        # An installed plugin that did not load is listed too: this listing is where one looks for it.
        for failure in registry.failures():
            table.add_row(kind, failure.name, f"{failure.value} [red](not loaded: {escape(failure.error)})[/red]",
                          failure.package, failure.version)
    console = Console(width=160)
    console.print(table)
    for entry_point in unread_entry_points():
        console.print(f"[yellow]warning[/] {escape(unread_note(entry_point))}")
    return 0


def help_text(docstring: str) -> str:
    """A module docstring as a command's help: reStructuredText's ``code`` shown as `code`."""
    return docstring.replace("``", "`")


class HelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text already says it or the option
    has none worth saying (a switch that is off, a setting that is unset, unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or not _worth_stating(action.default)
                or isinstance(action, argparse._StoreFalseAction)):  # a switch's default is that it is off
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``HelpFormatter`` for a command whose description keeps its own line breaks (its synopsis)."""


def _worth_stating(default: object) -> bool:
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return isinstance(default, (int, float)) or bool(default)  # 0 is a seed; an empty JSON object is not said


def exit_statuses(success: str, some_failed: str | None = None) -> str:
    """The end of a command's help: what its exit status means, in the one convention of every command."""
    failed = f"1 when {some_failed}, " if some_failed else ""
    # Filled here, as a command whose description keeps its line breaks keeps the epilog's too.
    return textwrap.fill(f"exit status: 0 when {success}, {failed}2 when the request cannot be done (an unknown "
                         "option, a missing or unusable input, ...), said in one line.", width=79)


def _verb(module: str, function: str = "main") -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    return run


# Commands that reach plugins only through the registries, which load them on first use: listing or
# checking shard folders need not import every model part first.
PLUGINS_ON_FIRST_USE = {"data"}

VERBS: dict[str, Callable[[list[str]], int]] = {
    "plugins": list_plugins,
    "data": _verb("data_tools.cli"),
    "generate": _verb("flowvid.generate"),
    "score": _verb("flowvid.score"),
    "export": _verb("flowvid.export"),
    "convert": _verb("flowvid.convert"),
}


#: One line per command for ``flowvid --help``.
SUMMARIES = {
    "fit": "train a model from a recipe (LightningCLI; --resume auto continues a run)",
    "validate": "bits/dim and denoising errors of a checkpoint on the validation shards",
    "data": "make, encode, verify and describe shard folders; FVD reference statistics and FVD of samples",
    "generate": "sample videos: text-to-video, image-to-video, extension, video-to-video",
    "score": "exact bits/dim of videos under a model, least likely first",
    "export": "a checkpoint (file or DeepSpeed directory) to one .safetensors file with its config.yaml",
    "convert": "weights of the reference implementation to a flowvid export",
    "plugins": "list the registered blocks, codecs, text encoders, samplers, extractors and datasets",
}


def usage() -> str:
    lines = [f"usage: flowvid {{{','.join([*LIGHTNING_VERBS, *VERBS])}}} ...", "", "commands:"]
    lines += [f"  {verb:<10} {SUMMARIES[verb]}" for verb in [*LIGHTNING_VERBS, *VERBS]]
    lines += ["", "`flowvid COMMAND --help` describes each command's options; `flowvid --version` the versions."]
    return "\n".join(lines)


def versions() -> str:
    """flowvid's version and those of the libraries that decide its numbers, for bug reports."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    others = ", ".join(f"{package} {installed(package)}" for package in ("torch", "lightning", "deepspeed"))
    return f"flowvid {installed('flowvid')} ({others}; Python {sys.version.split()[0]})"


def unknown_command(verb: str) -> str:
    """What to say of a command that does not exist: the likely one first, for a typo."""
    commands = [*LIGHTNING_VERBS, *VERBS]
    return f"unknown command {verb!r}{did_you_mean(verb, commands)}; choose one of {', '.join(commands)}"


@warnings_for_the_console()
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv == ["--version"]:
        print(versions())
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        if verb not in PLUGINS_ON_FIRST_USE:
            load_plugins()
        if verb in LIGHTNING_VERBS:
            return run_lightning(argv)
        if verb not in VERBS:
            raise UserError(unknown_command(verb))
        return VERBS[verb](rest)
    except UserError as err:
        print(f"flowvid {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # where no command says more of it (loading plugins, importing torch)
        print(f"flowvid {verb}: stopped by Ctrl-C", file=sys.stderr)
        return CTRL_C_EXIT_STATUS


if __name__ == "__main__":
    # Verbs raise flowvid.cli.UserError; run that module's main, not a second copy named __main__.
    from flowvid.cli import main as flowvid_main

    sys.exit(flowvid_main())
