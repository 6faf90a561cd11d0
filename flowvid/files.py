"""Reading the weight files a user names: a damaged or foreign file is one error that names it."""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

# How torch's safe loader names the class of a pickled object it refuses (torch.save(model) stores the model).
PICKLED_CLASS = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class TorchFileError(ValueError):
    """A file ``torch.load`` cannot read as tensors; ``problem`` says why in a few words, without the file."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


def read_torch_file(path: str | Path, what: str, hint: str = "") -> Any:
    """What ``torch.load`` reads from ``path`` (tensors and plain data only: no code runs).

    ``what`` names the file in the error (``"I3D weights"``); ``hint`` says how to get a good one.
    torch raises many kinds of error for a damaged file, some without a message (``EOFError`` on an
    empty one): each becomes a TorchFileError naming the file, in one line.
    """
    if is_torchscript(path):
        # torch would call it damaged and advise loading it with weights_only=False, which runs its code.
        problem = "it is a TorchScript program, not a file of tensors"
    else:
        try:
            with warnings.catch_warnings():  # torch's note on a foreign pickle's protocol: the error says more
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - see above
            problem = load_failure(err)
    raise TorchFileError(f"cannot read {what} {path}: {problem}" + (f"; {hint}" if hint else ""), problem)


def load_failure(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` could not read a file, in one line. Never torch's advice to load it
    with weights_only=False: that runs whatever code a pickled object brings, and is no fix for a file of
    another kind."""
    text = str(err).strip()
    pickled = PICKLED_CLASS.search(text)
    if pickled:
        return (f"it holds a pickled {pickled.group(1)} object, not a state dict of tensors; save "
                "`model.state_dict()` rather than the model itself")
    if "weights_only" in text or isinstance(err, KeyError):  # a KeyError's message is a byte of the file
        return "truncated, or not a PyTorch file"
    return f"truncated, or not a PyTorch file ({text.splitlines()[0] if text else type(err).__name__})"


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip whose records include its constants."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
