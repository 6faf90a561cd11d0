"""Pretrained models from local folders: a damaged, incomplete or foreign file is one error naming it.

transformers and diffusers load what they can. A weight the file lacks, or holds in another shape, is
drawn at random with a logged warning; a truncated file raises an error that names no file; a config
that does not fit its weights raises hundreds of lines. Each of these is one ValueError here, naming the
file and how to get a good one.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flowvid.checks import first_non_finite

GET_AGAIN = "copy the model folder again from a complete download, or write it again with save_pretrained(DIR)"
# "owner/name", as Hugging Face Hub ids are written.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download_first(path: str | Path, subfolder: str = "") -> str:
    """For a missing ``path`` written like a Hub id ("google/flan-t5-xl"): a clause saying how to download it
    before the run, since nothing is downloaded at run time. Empty for any other path.

    ``subfolder`` is the folder of the repository that holds the model ("vae" in a diffusers pipeline)."""
    name = str(path)
    if Path(name).exists() or not _HUB_ID.fullmatch(name):
        return ""
    include = f" --include '{subfolder}/*'" if subfolder else ""
    local = f"DIR/{subfolder}" if subfolder else "DIR"
    return (f"; if {name} is a Hugging Face Hub id: nothing is downloaded at run time, so download it first "
            f"(`hf download {name}{include} --local-dir DIR`) and give the local folder {local}")


def first_present(folder: Path, names: Iterable[str]) -> Path:
    """The first of ``names`` that is a file in ``folder`` (the folder itself when none is)."""
    return next((folder / name for name in names if (folder / name).is_file()), folder)


@contextlib.contextmanager
def reading(file: Path, what: str) -> Iterator[None]:
    """Raise any error of reading ``file`` (``what``: "T5 weights") as one ValueError naming it.

    A missing package (ImportError) is not the file's fault and keeps its own message."""
    try:
        yield
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, tokenizers and json each raise their own kinds
        text = str(err).strip()
        detail = text.splitlines()[0] if text else type(err).__name__
        raise ValueError(f"cannot read {what} {file}: damaged, truncated or of another model ({detail}); "
                         f"{GET_AGAIN}") from err


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """transformers' and diffusers' loading bars off: a frozen part loads at every command, in a fraction of a
    second, and its bar would print among the command's own lines each time."""
    turned_off = []
    for library in ("transformers", "diffusers"):
        try:
            logging = importlib.import_module(f"{library}.utils.logging")
        except ImportError:
            continue
        if logging.is_progress_bar_enabled():
            logging.disable_progress_bar()
            turned_off.append(logging)
    try:
        yield
    finally:
        for logging in turned_off:
            logging.enable_progress_bar()


def load_complete(load: Callable[..., Any], file: Path, what: str) -> Any:
    """``load(**options)``, a ``from_pretrained`` of transformers or diffusers, refusing weights that the file
    lacks or holds in another shape than the config describes (both libraries would draw them at random),
    and weights that hold NaN or inf (a frozen model would turn every batch into NaN)."""
    with reading(file, what), without_progress_bars():
        model, info = load(output_loading_info=True, ignore_mismatched_sizes=True)
    missing = sorted(info.get("missing_keys") or ())
    reshaped = sorted(f"{key} ({tuple(found)} in the file, {tuple(expected)} in the config)"
                      for key, found, expected in info.get("mismatched_keys") or ())
    problems = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("other shape", reshaped)) if names]
    if problems:
        raise ValueError(f"{what} {file} do not hold the model config.json describes ({'; '.join(problems)}); "
                         f"{GET_AGAIN}")
    if (damaged := first_non_finite(model.named_parameters())) is not None:
        raise ValueError(f"{what} {file} are damaged: {damaged} holds NaN or infinite values; {GET_AGAIN}")
    return model
