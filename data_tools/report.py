"""Progress bars and end-of-run summaries shared by the data tools (on stderr, stdout stays clean)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Messages are not wrapped at the console's width: a path broken over two lines cannot be copied.
console = Console(stderr=True, soft_wrap=True)


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


def print_summary(title: str, fields: dict[str, Any], skipped: Sequence[dict[str, str]] = (), show: int = 10) -> None:
    """A two-column table of results, the skip reasons with their counts, and the first few skips."""
    table = Table(title=title, show_header=False)
    for name, value in fields.items():
        table.add_row(name, f"{value:.3g}" if isinstance(value, float) else str(value))
    reasons = Counter(_reason_kind(item["reason"]) for item in skipped)
    for reason, count in reasons.most_common():
        table.add_row(f"skipped: {reason}", str(count), style="yellow")
    console.print(table)
    for item in list(skipped)[:show]:
        where = item.get("path") or item.get("key") or item.get("shard", "?")
        console.print(f"  [yellow]skipped[/] {where}: {item['reason']}")
    if len(skipped) > show:
        console.print(f"  ... and {len(skipped) - show} more (see the summary file)")


def _reason_kind(reason: str) -> str:
    """The part of a reason before its details: 'undecodable: ...' -> 'undecodable'."""
    return reason.split(":", 1)[0]
