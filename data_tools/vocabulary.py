"""``vocabulary``: the words of shard folders' captions, as the learned text encoder's vocabulary.

    flowvid data vocabulary DIR [DIR ...] [--min-count N] [--out FILE.yaml]

Lists the words of the captions of every sample, split as the learned text encoder's tokenizer splits
them (lower-cased, NFKC-normalised), sorted. With ``--out`` they go to a config file that the fit
command takes after the recipe, holding only the text encoder's ``vocabulary``:

    flowvid data vocabulary data/custom/train --out vocabulary.yaml
    flowvid fit --config recipes/custom/t2v_64px.yaml --config vocabulary.yaml

Without it they go to stdout as one JSON list that the fit command takes as it is, which suits a
short list (a long one can pass the shell's limit on the length of a command line):

    flowvid fit ... --model.init_args.text_encoder.init_args.vocabulary "$(flowvid data vocabulary data/custom/train)"

Digits, punctuation marks and the prompt template's words are left out: every vocabulary holds them.
``--min-count`` leaves out words met fewer times, to keep the vocabulary of a large folder short (the
encoder reads them as ``<unk>``). Only the captions are read, not the clips. A count of words and
captions and a warning for each damaged shard (whose captions before the damage are counted) go to
stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import yaml

from data_tools.report import console, load_folder_manifest
from flowvid.cli import exit_statuses
from flowvid.data.shards import captions_of_shards, shard_folder_files, shard_paths
from flowvid.paths import check_output_file, check_output_is_no_input, write_atomically
from flowvid.text.vocabulary import caption_words, vocabulary_of

EXIT_STATUS = exit_statuses("every shard is read", "a shard is damaged (the words before its damage are listed)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="DIR", help="shard folders (each with manifest.json)")
    parser.add_argument("--min-count", type=int, default=1, metavar="N",
                        help="leave out words met fewer than N times (default: %(default)s: every word)")
    parser.add_argument("--out", default=None, metavar="FILE.yaml",
                        help="write a config file for `flowvid fit --config` holding the text encoder's vocabulary, "
                             "instead of the JSON list on stdout")


def run(args: argparse.Namespace) -> int:
    if args.min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {args.min_count}")
    # Every manifest first: a mistyped folder stops the command before any shard is read.
    manifests = {folder: load_folder_manifest(folder) for folder in args.folders}
    if args.out is not None:
        check_output_file(args.out, "--out", "give the .yaml file to write")
        check_output_is_no_input(args.out, [file for folder, manifest in manifests.items()
                                            for file in shard_folder_files(folder, manifest)], "vocabulary")
    broken: list[str] = []
    words: Counter[str] = Counter()
    captions = 0
    for folder, manifest in manifests.items():
        damaged: list[str] = []
        listed = [shard["samples"] for shard in manifest["shards"]]
        for caption in captions_of_shards(shard_paths(folder, manifest), damaged, listed):
            words.update(caption_words([caption]))
            captions += 1
        broken += [f"{error} (run `flowvid data verify {folder}`)" for error in damaged]
    vocabulary = vocabulary_of(words, args.min_count)
    for error in broken:
        console.print(f"[yellow]warning:[/] skipped the rest of a damaged shard: {error}")
    if args.out is None:
        json.dump(vocabulary, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        write_config(Path(args.out), vocabulary, args.folders, args.min_count)
    left_out = len(vocabulary_of(words)) - len(vocabulary)
    console.print(f"{len(vocabulary)} words from {captions} captions"
                  + (f" ({left_out} met fewer than {args.min_count} times left out)" if left_out else "")
                  + ("" if args.out is None else f", written to {args.out}"))
    return 1 if broken else 0


def write_config(out: Path, vocabulary: list[str], folders: list[str], min_count: int) -> None:
    """Write ``out`` as a config that sets only the text encoder's ``vocabulary``, under a comment naming
    the command that wrote it: a recipe given before it keeps every other setting."""
    command = shlex.join(["flowvid", "data", "vocabulary", *folders, "--min-count", str(min_count), "--out", str(out)])
    lines = [f"The learned text encoder's vocabulary, written by: {command}",
             f"Give it after the recipe: flowvid fit --config RECIPE.yaml --config {shlex.quote(str(out))}"]
    # A newline in a folder's name must not end the comment.
    header = "".join(f"# {part}\n" for line in lines for part in line.splitlines())
    body = {"model": {"init_args": {"text_encoder": {"init_args": {"vocabulary": vocabulary}}}}}
    text = header + yaml.safe_dump(body, allow_unicode=True, sort_keys=False, width=float("inf"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda path: path.write_text(text, encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["vocabulary", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
