"""Progress bars and end-of-run summaries shared by the data tools.

Progress, warnings, errors and the summaries of the tools that write a folder go to stderr
(``console``); what a command is run to show, the tables of ``describe`` and ``verify``, goes to stdout
(``results``), so that ``flowvid data describe DIR | grep caption`` finds it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowvid.data.manifest import ManifestError, load_manifest, what_to_give

# Messages are not wrapped at the console's width: a path broken over two lines cannot be copied.
console = Console(stderr=True, soft_wrap=True)
results = Console(soft_wrap=True)


def error_prefix(verb: str) -> str:
    """``flowvid data VERB: error:``, in red: every data tool's errors name the command, as argparse's do."""
    return f"[red]flowvid data {verb}: error:[/]"


def print_error(verb: str, error: Exception | str) -> None:
    """One line on stderr for an input that stops its own part of a run of ``verb``, as ``flowvid data``
    prints one that stops all of it."""
    console.print(f"{error_prefix(verb)} {error}")


def load_folder_manifest(folder: str | Path) -> dict[str, Any]:
    """``load_manifest``, where a ``folder`` that is not there at all is said to be missing, rather than to
    lack a manifest as an unfinished shard folder does."""
    if not Path(folder).exists():
        raise ManifestError(f"{folder} does not exist ({what_to_give(folder)})")
    return load_manifest(folder)


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def print_summary(title: str, fields: dict[str, Any], skipped: Sequence[dict[str, Any]] = (), show: int = 10,
                  to: Console = console) -> None:
    """A two-column table of results, the skip reasons with the samples they cost, and the first few skips,
    printed ``to`` stderr (``console``) or stdout (``results``)."""
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # a path is folded over lines, never cut short to fit the terminal
    for name, value in fields.items():
        table.add_row(name, f"{value:.3g}" if isinstance(value, float) else str(value))
    reasons: Counter[str] = Counter()
    for item in skipped:
        reasons[_reason_kind(item["reason"])] += _samples_of(item)
    for reason, count in reasons.most_common():
        table.add_row(f"skipped: {reason}", str(count), style="yellow")
    to.print(table)
    for item in list(skipped)[:show]:
        where = item.get("path") or item.get("key") or item.get("shard", "?")
        to.print(f"  [yellow]skipped[/] {where}: {item['reason']}")
    if len(skipped) > show:
        to.print(f"  ... and {len(skipped) - show} more (see the summary file)")


def samples_skipped(skipped: Sequence[dict[str, Any]]) -> int:
    """How many samples the skips cost: an entry stands for one, unless it says ``"samples"`` (a broken shard)."""
    return sum(_samples_of(item) for item in skipped)


def _samples_of(item: dict[str, Any]) -> int:
    return int(item.get("samples", 1))


def _reason_kind(reason: str) -> str:
    """The part of a reason before its details: 'undecodable: ...' -> 'undecodable'."""
    return reason.split(":", 1)[0]
