"""``verify``: decode every sample of a shard folder and check it against its manifest.

    flowvid data verify DIR [DIR ...] [--json]

Checks the manifest, that every listed shard exists with its sha256 and sample count, that no shard
is unlisted or half-written (``*.tmp``), that every sample decodes with the declared shapes and
finite values, and that keys are unique; a manifest that lists no sample counts as damaged. Each
shard is read once, one sample at a time. The report goes to stdout (the progress bar to stderr);
``--json`` writes it as JSON for scripts instead of the tables, one object per folder (a list when
given several). Exits 1 when any folder is damaged, 0 when all are whole. A path that is no shard
folder at all (no manifest and no shards: a typo, a file, the folder holding ``train/`` and ``val/``)
is a one-line error, as for ``describe``, and exits 2 once the others are verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from data_tools.report import load_folder_manifest, print_error, progress_bar, results
from flowvid.cli import exit_statuses
from flowvid.data.manifest import MANIFEST_NAME, ManifestError
from flowvid.data.shards import (
    STAGING_PREFIX,
    TEMPORARY_SUFFIX,
    BadSample,
    BrokenShard,
    SampleSpec,
    decode_sample,
    iter_tar,
)


EXIT_STATUS = exit_statuses("every folder is whole", "a folder is damaged")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="DIR", help="shard folders (each with manifest.json)")
    parser.add_argument("--json", action="store_true", help="write the reports to stdout as JSON")


def run(args: argparse.Namespace) -> int:
    reports = []
    for folder in args.folders:
        try:
            report = verify_folder(folder, show_progress=True)
        except ManifestError as err:
            print_error("verify", err)
            continue
        if not args.json:  # each table as soon as its folder is read, not after the last one
            print_report(report)
        reports.append(report)
    if args.json and reports:
        json.dump(reports if len(args.folders) > 1 else reports[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    if len(reports) < len(args.folders):
        return 2
    return 0 if all(report["ok"] for report in reports) else 1


def verify_folder(folder: str | Path, show_progress: bool = False) -> dict[str, Any]:
    """Check one folder; ``report["ok"]`` is False when anything is wrong, ``problems`` says what.

    Raises ManifestError for a path that is no shard folder at all (``holds_shard_files``)."""
    folder = Path(folder)
    report: dict[str, Any] = {"folder": str(folder), "kind": None, "ok": False, "samples": 0, "shards_found": 0,
                              "shards": [], "problems": []}
    problems: list[str] = report["problems"]
    try:
        manifest = load_folder_manifest(folder)
    except ManifestError as err:
        if not holds_shard_files(folder):
            raise
        problems.append(str(err))
        problems += [f"half-written file {p.name}" for p in sorted(folder.glob(f"*{TEMPORARY_SUFFIX}"))]
        return report
    report["kind"] = manifest["kind"]
    if not manifest["samples"]:  # no tool writes such a folder, and nothing can train or validate on it
        problems.append("the manifest lists no sample: write the folder again")
    problems += [f"half-written file {p.name}" for p in sorted(folder.glob(f"*{TEMPORARY_SUFFIX}"))]
    problems += [f"{p.name} is left from a run that did not finish (or one still writing); remove it once none is"
                 for p in sorted(folder.glob(f"{STAGING_PREFIX}*")) if p.is_dir()]
    listed = {shard["name"] for shard in manifest["shards"]}
    problems += [f"shard {p.name} is not in the manifest" for p in sorted(folder.glob("*.tar")) if p.name not in listed]

    spec = SampleSpec.from_manifest(manifest)
    keys: dict[str, str] = {}  # each key's first shard
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"verify {folder.name}", total=len(manifest["shards"]))
        for entry in manifest["shards"]:
            row, usable = _verify_shard(folder / entry["name"], entry, spec, keys, problems)
            report["shards"].append(row)
            report["samples"] += usable
            bar.advance(task)
    report["shards_found"] = sum(shard["checksum"] != "missing" for shard in report["shards"])
    if report["samples"] != manifest["samples"]:
        problems.append(f"found {report['samples']} good samples, the manifest lists {manifest['samples']}")
    report["ok"] = not problems
    return report


def holds_shard_files(folder: Path) -> bool:
    """Whether ``folder`` is a shard folder, whole or damaged: it holds a manifest, or shards or half-written
    files that a run left without one. Anything else was given by mistake, and verifying it would call it
    damaged."""
    patterns = (MANIFEST_NAME, "*.tar", f"*{TEMPORARY_SUFFIX}")
    return folder.is_dir() and any(path.is_file() for pattern in patterns for path in folder.glob(pattern))


def _verify_shard(
    path: Path, entry: dict[str, Any], spec: SampleSpec, keys: dict[str, str], problems: list[str]
) -> tuple[dict[str, Any], int]:
    """Check one shard in a single pass over its bytes: its samples and its sha256 are read together, so a
    folder larger than memory is read from disk once. Returns its row and how many of its samples are
    good: none of a shard that reads whole but whose bytes differ from the manifest, as the tools that
    check (``shard_samples``) skip it all; those before the damage of a broken or short one."""
    row = {"name": entry["name"], "listed": entry["samples"], "found": 0, "bad": 0, "checksum": "missing"}
    if not path.is_file():
        problems.append(f"shard {entry['name']} is missing")
        return row, 0
    digest = hashlib.sha256()
    sample_problems: list[str] = []
    broken = False
    try:
        for raw in iter_tar(path, digest):
            try:
                sample = decode_sample(raw, spec)
            except BadSample as err:
                row["bad"] += 1
                sample_problems.append(f"shard {entry['name']}: {err.reason}: {err}")
                continue
            if sample["key"] in keys:
                sample_problems.append(f"shard {entry['name']}: duplicate_key: {sample['key']!r}, "
                                       f"also in shard {keys[sample['key']]}")
            keys.setdefault(sample["key"], entry["name"])
            row["found"] += 1
    except BrokenShard as err:
        broken = True
        sample_problems.append(f"shard {entry['name']}: broken_tar: {err}")
    held = row["found"] + row["bad"]
    row["checksum"] = "ok" if digest.hexdigest() == entry["sha256"] else "MISMATCH"
    changed = row["checksum"] != "ok" and not broken and held >= entry["samples"]
    if changed:
        problems.append(f"shard {entry['name']}: checksum: sha256 differs from the manifest, though the shard "
                        f"reads whole: its bytes changed after it was written, so none of its {held} samples "
                        "is good (encode-latents skips them; training reads them)")
    elif row["checksum"] != "ok":
        problems.append(f"shard {entry['name']}: sha256 differs from the manifest")
    problems += sample_problems
    if held != entry["samples"]:
        problems.append(f"shard {entry['name']}: holds {held} samples, the manifest lists {entry['samples']}")
    return row, 0 if changed else row["found"]


def print_report(report: dict[str, Any], show: int = 20) -> None:
    if report["shards"]:
        table = Table(title=f"verify {report['folder']} ({report['kind']})")
        for column in ("shard", "listed", "found", "bad", "sha256"):
            table.add_column(column)
        for row in report["shards"]:
            table.add_row(row["name"], str(row["listed"]), str(row["found"]), str(row["bad"]), row["checksum"])
        results.print(table)
    for problem in report["problems"][:show]:
        results.print(f"  [red]problem[/] {problem}")
    if len(report["problems"]) > show:
        results.print(f"  ... and {len(report['problems']) - show} more")
    verdict = "[green]OK[/]" if report["ok"] else "[red]DAMAGED[/]"
    # The missing shards are among the problems above.
    results.print(f"{verdict} {report['folder']}: {report['samples']} samples in {report['shards_found']} shards")


def main(argv: list[str] | None = None) -> int:
    from data_tools.cli import main as data_main

    return data_main(["verify", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
