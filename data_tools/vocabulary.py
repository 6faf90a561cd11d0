"""``vocabulary``: the words of shard folders' captions, as the learned text encoder's vocabulary.

    flowvid data vocabulary DIR [DIR ...] [--min-count N]

Prints the words of the captions of every sample, split as the learned text encoder's tokenizer splits
them (lower-cased, NFKC-normalised), sorted, as one JSON list that the fit command takes as it is:

    flowvid fit ... --model.init_args.text_encoder.init_args.vocabulary "$(flowvid data vocabulary data/custom/train)"

Digits, punctuation marks and the prompt template's words are left out: every vocabulary holds them.
``--min-count`` leaves out words met fewer times, to keep the vocabulary of a large folder short (the
encoder reads them as ``<unk>``). Only the captions are read, not the clips. The list goes to stdout,
a count of words and captions and a warning for each damaged shard (whose captions before the
damage are counted) to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from data_tools.report import console
from flowvid.cli import exit_statuses
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import captions_of_shards, shard_paths
from flowvid.text.vocabulary import caption_words, vocabulary_of

EXIT_STATUS = exit_statuses("every shard is read", "a shard is damaged (the words before its damage are listed)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="DIR", help="shard folders (each with manifest.json)")
    parser.add_argument("--min-count", type=int, default=1, metavar="N",
                        help="leave out words met fewer than N times (default: %(default)s: every word)")


def run(args: argparse.Namespace) -> int:
    if args.min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {args.min_count}")
    # Every manifest first: a mistyped folder stops the command before any shard is read.
    shards = [path for folder in args.folders for path in shard_paths(folder, load_manifest(folder))]
    broken: list[str] = []
    words: Counter[str] = Counter()
    captions = 0
    for caption in captions_of_shards(shards, broken):
        words.update(caption_words([caption]))
        captions += 1
    vocabulary = vocabulary_of(words, args.min_count)
    for error in broken:
        console.print(f"[yellow]warning:[/] skipped the rest of a damaged shard: {error}")
    json.dump(vocabulary, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    left_out = len(vocabulary_of(words)) - len(vocabulary)
    console.print(f"{len(vocabulary)} words from {captions} captions"
                  + (f" ({left_out} met fewer than {args.min_count} times left out)" if left_out else ""))
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["vocabulary", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
