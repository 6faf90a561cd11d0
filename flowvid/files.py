"""Reading the weight files a user names: a damaged or foreign file is one error that names it."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch


def read_torch_file(path: str | Path, what: str, hint: str = "") -> Any:
    """What ``torch.load`` reads from ``path`` (tensors and plain data only: no code runs).

    ``what`` names the file in the error (``"I3D weights"``); ``hint`` says how to get a good one.
    torch raises many kinds of error for a damaged file, some without a message (``EOFError`` on an
    empty one): each becomes a ValueError naming the file.
    """
    if is_torchscript(path):
        # torch would call it damaged and advise loading it with weights_only=False, which runs its code.
        raise ValueError(f"cannot read {what} {path}: it is a TorchScript program, not a file of tensors"
                         + (f"; {hint}" if hint else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - see above
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {what} {path}: truncated, or not a PyTorch file ({detail})"
                         + (f"; {hint}" if hint else "")) from err


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip whose records include its constants."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
