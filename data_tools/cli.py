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
from typing import Iterable

from data_tools.report import console, error_prefix
from flowvid.cli import RawDescriptionHelpFormatter, help_text

# Each verb's module and the summary ``flowvid data --help`` lists, the first line of the module's docstring:
# listing the verbs imports none of them, and running one imports only its own module.
VERBS: dict[str, tuple[str, str]] = {
    "from-videos": ("data_tools.from_videos",
                    "a folder or glob of video files plus captions -> raw clip shards with a manifest."),
    "make-synthetic": ("data_tools.make_synthetic",
                       "the built-in dataset of captioned moving shapes, made locally, deterministic by seed."),
    "encode-latents": ("data_tools.encode_latents", "raw clip shards -> latent shards through a registered codec."),
    "verify": ("data_tools.verify", "decode every sample of a shard folder and check it against its manifest."),
    "describe": ("data_tools.describe",
                 "what a shard folder holds, read from its manifest, with a few of its captions."),
    "vocabulary": ("data_tools.vocabulary",
                   "the words of shard folders' captions, as the learned text encoder's vocabulary."),
    "fvd-stats": ("data_tools.fvd_stats",
                  "FVD reference statistics of a raw shard folder, computed once and cached."),
    "fvd": ("data_tools.fvd", "FVD (or FVD-proxy) of generated videos against a real set, from the command line."),
}


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        if err.name != module_name:  # the module exists but something it needs does not
            warnings.warn(f"data tool {module_name} is unavailable: {err}", stacklevel=2)
        return None


def build_parser(prog: str = "flowvid data", verbs_read: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``flowvid data``. ``verbs_read``: the verbs whose options it knows, their modules
    imported (by default every verb's); the others are listed by their summary alone."""
    parser = argparse.ArgumentParser(prog=prog, description="Video files -> shards -> latent shards, and checks.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    read = set(VERBS if verbs_read is None else verbs_read)
    for verb, (module_name, summary) in VERBS.items():
        if verb not in read:
            verbs.add_parser(verb, help=help_text(summary))
            continue
        module = _load(module_name)
        if module is None:
            continue
        sub = verbs.add_parser(verb, help=help_text(summary), description=help_text(module.__doc__ or verb),
                               epilog=module.EXIT_STATUS, formatter_class=RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def verb_of(argv: list[str]) -> str | None:
    """The verb ``argv`` names: its first word that is no option."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the verb; returns the exit code.

    Bad input that stops a whole run (no videos found, a folder that is not a shard folder, a codec
    that cannot take the clip size) is reported in one line with exit code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(verbs_read=[verb_of(argv)]).parse_args(argv)
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
