"""``flowvid data VERB ...``: one entry point for the data tools.

Each verb is a module with ``add_arguments(parser)``, ``run(args) -> int`` and ``EXIT_STATUS``, what its
exit statuses mean (and its own ``main`` for ``python -m data_tools.<module>``). Another tool joins by adding a line to ``VERBS``; a verb whose
module is absent or fails to import is left out with a warning, and the others keep working.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from types import ModuleType

from data_tools.report import console, error_prefix
from flowvid.cli import RawDescriptionHelpFormatter, help_text

VERBS: dict[str, str] = {
    "from-videos": "data_tools.from_videos",
    "make-synthetic": "data_tools.make_synthetic",
    "encode-latents": "data_tools.encode_latents",
    "verify": "data_tools.verify",
    "describe": "data_tools.describe",
    "vocabulary": "data_tools.vocabulary",
    "fvd-stats": "data_tools.fvd_stats",
    "fvd": "data_tools.fvd",
}


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        if err.name != module_name:  # the module exists but something it needs does not
            warnings.warn(f"data tool {module_name} is unavailable: {err}", stacklevel=2)
        return None


def build_parser(prog: str = "flowvid data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Video files -> shards -> latent shards, and checks.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, module_name in VERBS.items():
        module = _load(module_name)
        if module is None:
            continue
        summary = (module.__doc__ or verb).strip().split("\n")[0].split(": ", 1)[-1]  # drop the "``verb``: "
        sub = verbs.add_parser(verb, help=help_text(summary), description=help_text(module.__doc__ or verb),
                               epilog=module.EXIT_STATUS, formatter_class=RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the verb; returns the exit code.

    Bad input that stops a whole run (no videos found, a folder that is not a shard folder, a codec
    that cannot take the clip size) is reported in one line with exit code 2.
    """
    args = build_parser().parse_args(argv)
    error = error_prefix(args.verb)
    try:
        return args.run(args)
    except (ValueError, KeyError) as err:
        console.print(f"{error} {err}")
        return 2
    except FileNotFoundError as err:  # a missing input (a checkpoint, weights): the message says which and what to do
        message = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        console.print(f"{error} {message}")
        return 2
    except OSError as err:  # a full disk, a folder without write permission: the data there is left as it was
        where = f" ({err.filename})" if err.filename else ""
        console.print(f"{error} cannot write or read{where}: {err.strerror or err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
