"""The ``README.md`` that ``flowvid export`` writes beside an export: what the model is and how to use it.

Everything in it comes from the export itself (its tensors, metadata and ``config.yaml``), so the card
and the weights cannot disagree. A ``README.md`` that flowvid did not write is never replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowvid.media import DEFAULT_FPS

CARD_NAME = "README.md"
#: The first line of every card: how a card is told from a README of someone else's.
CARD_MARK = "<!-- flowvid model card -->"
#: The parts of a FlowModule's state dict, by key prefix, as the card lists them.
PARTS = {"flow": "flow", "denoiser": "denoiser", "text_encoder": "text encoder", "codec": "codec"}


def parameter_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Values per part of the module (``flow``, ``denoiser``, ...), in the order of ``PARTS``."""
    counts = {part: 0 for part in PARTS}
    for name, tensor in tensors.items():
        part = name.split(".", 1)[0]
        if part in counts:
            counts[part] += tensor.numel()
    return {part: count for part, count in counts.items() if count}


def model_card(folder: str | Path, file_name: str, metadata: dict[str, Any], config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> str:
    """The card's Markdown for the export ``folder/file_name``; ``metadata`` as ``read_export_metadata``
    gives it."""
    init = (config.get("model") or {}).get("init_args") or {}
    video = init.get("video_shape")
    codec, text = metadata.get("codec"), metadata.get("text_encoder")
    train_dir = ((config.get("data") or {}).get("init_args") or {}).get("train_dir")
    parameters = ", ".join(f"{PARTS[part]} {_millions(count)}" for part, count in parameter_counts(tensors).items())
    rows = [
        ("parameters", parameters),
        ("video", f"{video[0]} frames of {video[1]}x{video[2]} pixels" if video else "see config.yaml"),
        ("frame rate", frame_rate_row(metadata.get("fps"))),
        ("latent codec", f"`{codec['name']}` (config {codec.get('config_hash', '?')[:12]})" if codec else "see config.yaml"),
        ("text", f"`{text['name']}`" if text else "none: an unconditional model"),
        ("guidance (default)", str(init.get("guidance", "see config.yaml"))),
        ("trained on", ", ".join(f"`{d}`" for d in ([train_dir] if isinstance(train_dir, str) else train_dir))
         if train_dir else "see config.yaml"),
        ("training steps", metadata.get("global_step") or "unknown"),
        ("weights", f"{metadata.get('weights', '?')} ({metadata.get('dtype', '?')})"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    prompt = "" if not text else '"your caption"'
    # The folder by its own name: the card travels with it, the path it was exported to does not.
    where = Path(folder).name or "."
    return f"""{CARD_MARK}
# {Path(folder).name or file_name}

A normalizing-flow video generator of the STARFlow-V family: it gives the exact likelihood of a video
and samples frame after frame. Exported by flowvid {metadata.get("flowvid_version") or "?"} from
`{metadata.get("source", "?")}`.

| | |
|---|---|
{table}

`{file_name}` holds the weights (safetensors, no pickle) and `config.yaml` rebuilds the model.

## Use

From the folder that holds `{where}/`:

```python
from flowvid import VideoPipeline

pipe = VideoPipeline.from_pretrained("{where}")
videos = pipe([{prompt}], seed=0).videos            # uint8 (B, T, H, W, 3)
```

```bash
flowvid generate --ckpt {where} {'--prompt ' + prompt + ' ' if prompt else ''}--out samples/
flowvid score --ckpt {where} --input clips/ --out scores.jsonl
```
"""


def frame_rate_row(fps: float | None) -> str:
    """The card's frame rate: that of the training clips, at which generate writes and score reads videos."""
    if fps is None:
        return f"unknown (not recorded by the run): generate writes {DEFAULT_FPS:g} fps unless given --fps"
    return f"{fps:g} fps, as trained: generate writes its videos at it and score reads video files at it"


def is_card(path: Path) -> bool:
    """Whether ``path`` is a card flowvid wrote."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.readline().strip() == CARD_MARK
    except OSError:
        return False


def is_replaceable(path: Path) -> bool:
    """Whether a card may be written at ``path``: nothing is there, or a card flowvid wrote."""
    return not path.exists() or is_card(path)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10**5 else f"{count:,}"
