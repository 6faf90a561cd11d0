"""The files and folders a model's parts load themselves (a T5 folder, a Wan VAE, a VideoVAE file).

A run's config names them as it was given them, often relative to the folder the run was started in. A
model that moves with such a folder beside it still loads: a relative path the current folder lacks is
also looked for in the folders ``flowvid.export.load_exported`` and ``flowvid.loading.load_model`` name
(beside an export; for a checkpoint, where its run started, its run directory and its own folder).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

#: The settings of a model's parts that name a file or folder they load.
FILE_SETTINGS = ("path", "checkpoint")


def part_files(config: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """``(setting, init_args, key)`` of each part's file setting (``FILE_SETTINGS``) that holds a path."""
    found = []
    for name, part in ((config.get("model") or {}).get("init_args") or {}).items():
        init_args = part.get("init_args") if isinstance(part, dict) else None
        for key in FILE_SETTINGS if isinstance(init_args, dict) else ():
            if isinstance(init_args.get(key), str) and init_args[key]:
                found.append((f"model.init_args.{name}.init_args.{key}", init_args, key))
    return found


def with_files_found(config: dict[str, Any], folders: list[Path]) -> dict[str, Any]:
    """``config`` with each relative file setting that the current folder lacks but one of ``folders``
    holds pointed there."""
    config = copy.deepcopy(config)
    for _, init_args, key in part_files(config):
        given = Path(init_args[key])
        if given.is_absolute() or given.exists():
            continue
        found = next((folder / given for folder in folders if (folder / given).exists()), None)
        if found is not None:
            init_args[key] = str(found)
    return config


def missing_files(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(setting, path)`` of each file setting whose path does not exist."""
    return [(setting, init_args[key]) for setting, init_args, key in part_files(config)
            if not Path(init_args[key]).exists()]


def missing_file_line(where: str, setting: str, value: str, folders: list[Path]) -> str:
    """Which file of the model is missing, where it was looked for, and how to give it, in one line."""
    if Path(value).is_absolute():
        return (f"cannot build the model of {where}: {setting} {value} does not exist on this machine; put the "
                "folder the model was made with there")
    looked = ", ".join(str(folder) for folder in folders)
    return (f"cannot build the model of {where}: {setting} {value} is in neither the current folder nor {looked}; "
            f"copy the folder the model was made with to {folders[0] / value}, or run from the folder that holds "
            f"{value}")


def run_folders(checkpoint: Path, config: dict[str, Any]) -> list[Path]:
    """The folder a checkpoint's run was started in and its run directory, found from the run's relative
    ``trainer.default_root_dir`` in the checkpoint's path: where relative paths of its config were meant."""
    root = (config.get("trainer") or {}).get("default_root_dir")
    if not isinstance(root, str) or Path(root).is_absolute():
        return []
    parts = Path(os.path.normpath(root)).parts
    for run_dir in checkpoint.resolve().parents:
        if run_dir.parts[-len(parts):] == parts and len(run_dir.parts) > len(parts):
            return [Path(*run_dir.parts[:-len(parts)]), run_dir]
    return []
