"""Output paths checked before any work: a path that can never be written is refused up front, in one
line, instead of failing with a traceback after minutes of sampling, scoring or encoding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

#: What a file is called while it is being written (``write_atomically``, checkpoints).
PARTIAL_SUFFIX = ".partial"


def blocking_file(path: Path) -> Path | None:
    """The file that ``path``, or the nearest of its parents that exists, is; None when that is a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_folder(folder: str | Path, name: str, hint: str, error: type[Exception] = ValueError) -> None:
    """``folder`` must be a folder or a path where one can be made; ``name`` is how the user gave it."""
    folder = Path(folder)
    blocker = blocking_file(folder)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"is inside the file {blocker}"
        raise error(f"{name} {folder} {where}; {hint}")


def check_output_file(file: str | Path, name: str, hint: str, error: type[Exception] = ValueError) -> None:
    """``file`` must be a file, or a path where one can be written: not a folder, not inside a file."""
    file = Path(file)
    if file.is_dir():
        raise error(f"{name} {file} is a folder; {hint}")
    blocker = blocking_file(file.parent)
    if blocker is not None:
        raise error(f"{name} {file} is inside the file {blocker}; give a path in a folder")


def check_output_is_no_input(out: str | Path, inputs: Iterable[Path], written: str,
                             error: type[Exception] = ValueError) -> None:
    """Refuse an ``--out`` that is one of the files read: writing the ``written`` there would destroy it."""
    if Path(out).resolve() in {Path(path).resolve() for path in inputs}:
        raise error(f"--out {out} is one of the inputs, and writing the {written} over it would destroy it; "
                    "give another file")


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` the file beside ``path``, then rename it: a crash never leaves half a file at ``path``.

    The file's bytes reach the disk before the rename and the rename after it, as checkpoints are
    written: a power cut, unlike a crash, loses what is not flushed, and could leave an empty file under
    the final name or bring back the one it replaced."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        write(partial)
        # Some writers create their file private (safetensors does, 0600); an export is shared like any
        # file the user writes.
        os.chmod(partial, 0o666 & ~_umask())
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk: a rename is durable only once its folder is, so that a power
    cut after it cannot bring back the old file. Systems that cannot open a folder (Windows) skip it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask; setting it is the only portable way to read it, so it is set back at once."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
