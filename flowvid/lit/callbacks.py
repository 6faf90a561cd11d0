"""Training callbacks that watch samples: TensorBoard videos of fixed prompts, and FVD every K steps.

Both work with any LightningModule that offers::

    generate_videos(captions: list[str], seed: int) -> uint8 tensor (B, T, H, W, 3)

(``FlowModule`` does). Both are off unless added to the trainer, and their cost is set by their
arguments: how often (``every_n_steps``) and how many videos. Every process samples, because a
sharded model (DeepSpeed ZeRO-3, FSDP) needs all of them in the forward pass; only rank 0 writes.
Validation bits/dim is logged by the module itself (``val/bits_per_dim``).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Hashable, Iterator, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flowvid.checks import check_positive, is_integer
from flowvid.data.shards import captions_of_shards, shard_paths
from flowvid.lit.tensorboard import (MAX_GIF_FPS, add_video_gif, frame_grid, gif_bytes, tensorboard_writers,
                                     tile_videos)
from flowvid.lit.step_axis import logged_step
from flowvid.lit.throughput import apart_from_training
from flowvid.metrics.extractor import FVDExtractor, check_video
from flowvid.metrics.fvd import FrechetVideoDistance


class Samples(NamedTuple):
    """Sampled uint8 videos ``(B, T, H, W, 3)`` and how many of them diverged (NaN or infinite latents)."""

    videos: torch.Tensor
    diverged: int


def generate(pl_module: LightningModule, captions: list[str], seed: int) -> Samples:
    """``pl_module``'s samples in eval mode, without gradients and without touching the global RNG."""
    was_training = pl_module.training
    cuda_devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    pl_module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
            samples = _sample(pl_module, list(captions), seed)
    finally:
        pl_module.train(was_training)
    try:
        check_video(samples.videos)
    except ValueError as err:
        raise ValueError(f"{type(pl_module).__name__}.generate_videos: {err}") from None
    if samples.videos.shape[0] != len(captions):
        raise ValueError(f"{type(pl_module).__name__}.generate_videos returned {samples.videos.shape[0]} videos for "
                         f"{len(captions)} captions")
    return samples


def _sample(pl_module: LightningModule, captions: list[str], seed: int) -> Samples:
    """A module with ``sample_latents`` and a ``codec`` (FlowModule) is sampled in two halves, so that
    samples that diverged are counted: their NaN latents decode to black frames, which look like any
    other uint8 video. Another module's ``generate_videos`` is taken as it comes."""
    sample_latents = getattr(pl_module, "sample_latents", None)
    if sample_latents is None:
        return Samples(pl_module.generate_videos(captions, seed), 0)
    latents = sample_latents(captions, seed)
    diverged = int((~torch.isfinite(latents).flatten(1).all(dim=1)).sum())
    return Samples(pl_module.codec.decode(latents), diverged)


def caption_list(owner: str, captions: Any) -> list[str]:
    """The prompts as a list; a single string is refused (``list`` would make each of its letters a prompt)."""
    if captions is None:
        return []
    if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
        raise ValueError(f"{owner} captions must be a list of strings, got {captions!r}; "
                         "in YAML, one prompt per line under 'captions:', each starting with '- '")
    return list(captions)


def check_seed(owner: str, seed: Any) -> None:
    """A seed torch's generators take: a float one would fail only at the first sampling, steps into the run."""
    if not is_integer(seed):
        raise ValueError(f"{owner} seed must be an integer, got {seed!r}")


class _EveryNSteps(Callback):
    """Runs ``run`` after every ``every_n_steps``-th optimizer step (once per step, also with gradient accumulation)."""

    def __init__(self, every_n_steps: int):
        # A float step count would run at its multiples, or never (NaN, inf).
        if not (is_integer(every_n_steps) and every_n_steps >= 1):
            raise ValueError(f"{type(self).__name__} every_n_steps must be >= 1, a whole number of optimizer steps, "
                             f"got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run has already run at the step it starts at

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            with apart_from_training(trainer):  # evaluation, like validation: not in the training speed
                self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError


class SampleVideoLogger(_EveryNSteps):
    """Samples the same prompts with the same seed every ``every_n_steps`` steps and logs them to TensorBoard.

    Without ``captions``, the prompts are the first ``from_validation`` captions of the validation
    shards (``VideoShardDataModule``'s first ``val_dir``), in stored order and read without the clips
    when training starts: the same on every process and at every resume of the same data. A model
    without a text encoder, or a run without validation shards, samples one unconditional video.

    Writes ``<tag>/video`` (an animated GIF, the prompts side by side, in the Images tab) and
    ``<tag>/frames`` (a grid: one row per prompt, one column per frame); the prompts are logged once
    as text under ``<tag>/captions``. A run without a TensorBoardLogger (CSV, W&B, none) gets the same as
    files instead: ``<default_root_dir>/<tag>/step=NNNNNNNN.gif`` and ``.png``, and ``captions.txt``.
    Samples that diverge (NaN latents) show as black frames, and a warning says how many.

    Args:
        every_n_steps: optimizer steps between two samplings.
        captions: the prompts, one video each ("" samples unconditionally); default: the validation
            shards' first captions.
        seed: noise seed; fixed, so that the videos of successive steps differ only by training.
        fps: playback speed of the GIF, at most 50 (a GIF frame shows for at least 20 ms).
        tag: name prefix in TensorBoard.
        from_validation: how many validation captions to sample when ``captions`` is not given.
    """

    def __init__(self, every_n_steps: int = 1000, captions: list[str] | None = None, seed: int = 0, fps: float = 8.0,
                 tag: str = "samples", from_validation: int = 4):
        super().__init__(every_n_steps)
        check_seed("SampleVideoLogger", seed)
        check_positive("SampleVideoLogger fps", fps)  # the GIF's frame duration is 1000 / fps ms
        if fps > MAX_GIF_FPS:
            raise ValueError(f"SampleVideoLogger fps must be at most {MAX_GIF_FPS:g}, got {fps!r}: GIF players show "
                             "a frame for at least 20 ms; the samples' frames are all shown, so give a lower fps")
        if not (is_integer(from_validation) and from_validation >= 1):
            raise ValueError(f"SampleVideoLogger from_validation must be a whole number >= 1, got {from_validation!r}; "
                             "give captions: [\"\"] for one unconditional sample")
        self._given_captions = caption_list("SampleVideoLogger", captions)
        self.from_validation = from_validation
        self.captions = self._given_captions or [""]  # until setup finds the validation data's
        self.seed, self.fps, self.tag = seed, fps, tag
        self._logged_captions: list[str] | None = None  # kept in checkpoints: a resumed run logs them once

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_a_shared_tag(self, trainer)
        if self._given_captions:
            return
        reads_text = getattr(pl_module, "text_encoder", None) is not None
        captions = validation_captions(trainer, self.from_validation) if reads_text else []
        self.captions = captions if any(captions) else [""]  # uncaptioned clips: one unconditional sample

    @property
    def state_key(self) -> str:
        # Loggers of different tags keep their states side by side in the checkpoint.
        return self._generate_state_key(tag=self.tag)

    # The state is kept through on_save/on_load_checkpoint rather than state_dict: Lightning refuses two
    # callbacks with a state_dict under one state_key at Trainer construction with a long traceback, before
    # setup() can say in one line which two loggers share a tag.
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"logged_captions": self._logged_captions}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is not None:
            self._logged_captions = state["logged_captions"]

    @property
    def _captions_logged(self) -> bool:
        """A run resumed with other prompts logs its own."""
        return self._logged_captions == self.captions

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        videos, diverged = generate(pl_module, self.captions, self.seed)
        if not trainer.is_global_zero:
            return
        if diverged:
            rank_zero_warn(f"SampleVideoLogger: {diverged} of {len(self.captions)} samples came out NaN or infinite "
                           f"at step {trainer.global_step} and show as black frames: the model's samples diverge")
        writers = tensorboard_writers(trainer)
        if not writers:
            self._write_files(Path(trainer.default_root_dir) / self.tag, videos, trainer.global_step)
        for writer in writers:
            add_video_gif(writer, f"{self.tag}/video", videos, logged_step(trainer), fps=self.fps)
            writer.add_image(f"{self.tag}/frames", frame_grid(videos), logged_step(trainer))
            if not self._captions_logged:
                listing = "\n".join(f"{i}. {caption or '(unconditional)'}" for i, caption in enumerate(self.captions))
                writer.add_text(f"{self.tag}/captions", listing, logged_step(trainer))
        self._logged_captions = self.captions

    def _write_files(self, folder: Path, videos: torch.Tensor, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if not self._captions_logged:
            rank_zero_info(f"SampleVideoLogger: no TensorBoardLogger, so the samples go to {folder}")
            (folder / "captions.txt").write_text("".join(f"{caption or '(unconditional)'}\n"
                                                         for caption in self.captions))
        name = f"step={step:08d}"
        (folder / f"{name}.gif").write_bytes(gif_bytes(tile_videos(videos), self.fps))
        Image.fromarray(frame_grid(videos).permute(1, 2, 0).numpy()).save(folder / f"{name}.png")

    def describe(self) -> str:
        prompts = f"{len(self._given_captions)} prompt(s)" if self._given_captions else "the validation captions"
        return f"every {self.every_n_steps} steps, {prompts}"


def refuse_a_shared_tag(logger: SampleVideoLogger, trainer: Trainer) -> None:
    """Two loggers under one tag would write their images over each other's (the same TensorBoard tags, the
    same files at the steps they share)."""
    others = [other for other in trainer.callbacks if isinstance(other, SampleVideoLogger) and other is not logger
              and other.tag == logger.tag]
    if others:
        raise ValueError(f"two SampleVideoLoggers write under tag {logger.tag!r} ({others[0].describe()}; "
                         f"{logger.describe()}): the recipe may already list one; give the other its own "
                         "init_args.tag, or leave it out")


def validation_captions(trainer: Trainer, count: int) -> list[str]:
    """The first ``count`` captions of the trainer's validation shards (its data module's first
    ``val_dir``), in stored order; none when it has no validation shards. Only the shards' tar headers
    and captions are read, as far as the ``count``-th caption."""
    datamodule = trainer.datamodule
    manifest = getattr(datamodule, "val_manifest", None)  # a data module of another kind has no shards to read
    if manifest is None:
        return []
    shards = shard_paths(datamodule.val_dirs[0], manifest)
    return list(itertools.islice(captions_of_shards(shards), count))


class FVDCallback(_EveryNSteps):
    """FVD (or FVD-proxy) of ``num_samples`` generated videos every ``every_n_steps`` steps.

    The value is logged under its protocol name, e.g. ``fvd/i3d_f16_r64_n256`` or
    ``fvd_proxy/inception-proxy_f16_r64_n256``, and put in ``trainer.callback_metrics`` (so a
    ModelCheckpoint can monitor it). An evaluation in which generated videos diverge (NaN latents, black
    frames once decoded) logs NaN, with a warning that counts them.

    The real side is either a reference file from ``flowvid data fvd-stats`` (``reference=path``),
    or ``num_samples`` validation videos read once at the first evaluation (``reference="val"``), each
    clip (told apart by the batches' ``key``) once over all processes: batches with ``latents`` are
    decoded by ``pl_module.codec``, others give their ``video``. A reference file whose frames or
    resolution differ from ``pl_module.video_shape`` is refused before the first step.

    Sample ``i`` gets the same caption and noise at every evaluation and on any number of processes, so
    that a run resumed on another number of processes continues the same curve.

    Args:
        every_n_steps: optimizer steps between two evaluations.
        num_samples: generated videos per evaluation, split over the processes; more than the
            feature dimension (400 for I3D) for a meaningful covariance.
        extractor: registered FVD extractor name or instance ("i3d" needs its weights file).
        extractor_args: constructor arguments of a named extractor, e.g. ``{"weights": path}``.
        reference: path of cached reference statistics, or "val".
        captions: prompts, cycled over the samples; default: the validation captions with
            ``reference="val"``, else unconditional ("").
        batch_size: videos per ``generate_videos`` call.
        seed: noise seed of the first sample; sample ``i`` of an evaluation uses the same noise every time.
    """

    def __init__(self, every_n_steps: int = 5000, num_samples: int = 256, extractor: str | FVDExtractor = "inception-proxy",
                 extractor_args: dict[str, Any] | None = None, reference: str | Path = "val",
                 captions: list[str] | None = None, batch_size: int = 8, seed: int = 0):
        super().__init__(every_n_steps)
        check_seed("FVDCallback", seed)
        if not (is_integer(num_samples) and num_samples >= 2 and is_integer(batch_size) and batch_size >= 1):
            raise ValueError(f"FVDCallback needs whole numbers num_samples >= 2 and batch_size >= 1, "
                             f"got {num_samples!r} and {batch_size!r}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.extractor, self.extractor_args = extractor, extractor_args
        self.reference = reference
        self.captions = caption_list("FVDCallback", captions) or None
        self.metric: FrechetVideoDistance | None = None
        self._real_collected = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refuse_a_twin(trainer)
        # Built here, before the first step, so that missing weights or a stale reference fail at once.
        if self.metric is None:
            self.metric = FrechetVideoDistance(self.extractor, self.extractor_args)
            if str(self.reference) != "val":
                self.metric.set_reference(self.reference)
                self._real_collected = True
        if self.metric.reference is not None:
            self._check_reference_fits(pl_module)

    def _protocol_settings(self) -> tuple[str, str, int]:
        """What the logged name is made of, besides the generated videos' shape (the same for every callback)."""
        extractor = self.extractor if isinstance(self.extractor, str) else type(self.extractor).__name__
        return extractor, repr(sorted((self.extractor_args or {}).items())), self.num_samples

    def _refuse_a_twin(self, trainer: Trainer) -> None:
        """Two callbacks of one extractor, settings and sample count log under one name, each over the other's
        values (a reference file and ``reference: val``, say)."""
        if any(isinstance(other, FVDCallback) and other is not self
               and other._protocol_settings() == self._protocol_settings() for other in trainer.callbacks):
            extractor, _, count = self._protocol_settings()
            raise ValueError(f"two FVDCallbacks measure {extractor} FVD of {count} samples: both would log under "
                             "one name; give one of them another num_samples, or leave it out")

    def _check_reference_fits(self, pl_module: LightningModule) -> None:
        """A module that says what it generates (``video_shape``, as ``FlowModule`` does) is checked against
        the reference now; any other is checked by the metric at the first evaluation."""
        generated = getattr(pl_module, "video_shape", None)
        stats = self.metric.reference
        reference = (stats.frames, stats.height, stats.width)
        if generated is not None and tuple(generated) != reference:
            raise ValueError(
                f"FVDCallback: the reference {self.reference} holds videos of (frames, height, width) {reference}, "
                f"{type(pl_module).__name__} generates {tuple(generated)} (its video_shape); compute a reference "
                f"that fits with `flowvid data fvd-stats RAW_DIR --frames {generated[0]}` on clips of "
                f"{generated[1]}x{generated[2]}")

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.metric is not None, "FVDCallback.setup() did not run"
        started = time.perf_counter()
        metric = self.metric.to(pl_module.device)
        if not self._real_collected:
            # Starting a DataLoader draws its seed from the global generator: training's random numbers
            # must not depend on whether FVD is measured.
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                self._collect_real(trainer, pl_module)
        metric.reset()  # the generated side only; real statistics are kept
        captions = self.captions or [""]
        diverged = 0
        refused = RefusedFeatures()
        for start in batch_starts(self.num_samples, self.batch_size, trainer.global_rank, trainer.world_size):
            if start is None:
                generate(pl_module, captions[:1], self.seed)  # in step with the other processes, not counted
                continue
            end = min(start + self.batch_size, self.num_samples)
            prompts = [captions[i % len(captions)] for i in range(start, end)]
            samples = generate(pl_module, prompts, self.seed + start)
            refused.update(metric, samples.videos, real=False)
            diverged += samples.diverged
        refused.raise_on_every_process(trainer, pl_module)
        value = metric.compute()
        name = metric.protocol_name
        diverged = _sum_over_processes(trainer, pl_module, diverged)
        if diverged:
            # The black frames of diverged samples would give a finite FVD that a ModelCheckpoint could rank best.
            rank_zero_warn(f"FVDCallback: {diverged} of {self.num_samples} generated videos came out NaN or infinite "
                           f"at step {trainer.global_step}; {name} is logged as NaN")
            value = torch.full_like(value, math.nan)
        trainer.callback_metrics[name] = value.float()
        for logger in trainer.loggers:
            logger.log_metrics({name: float(value)}, step=logged_step(trainer))
        rank_zero_info(f"{name} = {float(value):.4g} at step {trainer.global_step} ({time.perf_counter() - started:.1f} s)")

    def _collect_real(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This process's share of real validation videos, and the captions of all of them (in the order
        of the rounds, then of the processes: the same list on every process) when none were given.

        Each clip counts once over all processes, by its ``key``: a loader that pads or repeats so that
        every rank gets as many batches (``val_batches``, a distributed sampler) would otherwise weigh
        some clips twice in the real statistics."""
        assert self.metric is not None
        _, wanted = self._share(trainer, self.num_samples)
        captions: list[str] = []
        taken_keys: set[Hashable] = set()  # over all processes, the same on each
        collected = total = 0
        refused = RefusedFeatures()
        batches = _validation_batches(trainer)
        while True:
            # Every process offers a batch (or None once it has its share or no more data) in each round,
            # so that all of them gather as often.
            batch = next(batches, None) if collected < wanted else None
            offers = _gather_objects(trainer, None if batch is None else _offer(batch, wanted - collected))
            if offers.count(None) == len(offers):
                break
            taken = take_new_clips(offers, taken_keys)
            captions += [offer.captions[i] for offer, positions in zip(offers, taken) for i in positions]
            total += sum(map(len, taken))
            mine = taken[trainer.global_rank]
            if mine:
                refused.update(self.metric, real_videos(_pick(batch, mine), pl_module), real=True)
                collected += len(mine)
            else:
                _decode_in_step(offers, taken, pl_module)
        refused.raise_on_every_process(trainer, pl_module)
        if total < 2:  # compute() would fail with no word of where the real videos come from
            raise ValueError(f"FVDCallback(reference='val'): the validation data gave {total} real videos, FVD needs "
                             "at least 2; give more validation clips, or reference statistics from "
                             "`flowvid data fvd-stats`")
        if total < self.num_samples:
            rank_zero_warn(f"FVDCallback: the validation data gave {total} distinct real videos, {self.num_samples} "
                           "were asked for; the FVD uses what there is")
        if self.captions is None and any(captions):
            self.captions = captions
        self._real_collected = True

    @staticmethod
    def _share(trainer: Trainer, total: int) -> tuple[int, int]:
        """(first index, count) of this process's part of ``total`` samples."""
        rank, world = trainer.global_rank, trainer.world_size
        base, extra = divmod(total, world)
        return rank * base + min(rank, extra), base + (rank < extra)


class RefusedFeatures:
    """The metric's refusal of a batch (an extractor giving NaN features, say), kept until every process can
    raise it together: one process raising alone would leave the others waiting for it in the next
    collective call."""

    def __init__(self) -> None:
        self.message: str | None = None

    def update(self, metric: FrechetVideoDistance, videos: torch.Tensor, real: bool) -> None:
        if self.message is not None:  # the evaluation fails anyway: only keep in step
            return
        try:
            metric.update(videos, real=real)
        except ValueError as refusal:
            self.message = str(refusal)

    def raise_on_every_process(self, trainer: Trainer, pl_module: LightningModule) -> None:
        refusing = _sum_over_processes(trainer, pl_module, int(self.message is not None))
        if refusing:
            raise ValueError(self.message or f"FVDCallback: the FVD metric refused the features of {refusing} "
                                             "other process(es); their log says why")


def _sum_over_processes(trainer: Trainer, pl_module: LightningModule, count: int) -> int:
    return int(trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum"))


def batch_starts(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[int | None]:
    """The first sample of each batch that process ``rank`` generates; None for a batch it samples only to
    keep in step. The batches are cut as one process cuts them and dealt to the processes in turn, so
    that sample ``i`` gets the same noise on any number of processes. Every process samples as many
    batches: a sampler that keeps its passes in step across processes (Jacobi under a process group)
    would wait for a batch never sampled."""
    starts = list(range(0, num_samples, batch_size))
    mine: list[int | None] = list(starts[rank::world_size])
    return mine + [None] * (math.ceil(len(starts) / world_size) - len(mine))


class Offer(NamedTuple):
    """What one process offers in a round of reading the real clips."""

    keys: list[Hashable | None]  # a clip's key, None where the batch has none
    room: int  # how many clips the process still wants
    captions: list[str]
    latent_shape: tuple[int, ...] | None  # of one clip, when the batch holds latents for the codec to decode


def _offer(batch: dict[str, Any], room: int) -> Offer:
    count = len(_clips(batch))
    latents = batch.get("latents")
    return Offer(_batch_keys(batch), room, list(batch.get("caption", [""] * count)),
                 None if latents is None else tuple(latents.shape[1:]))


def take_new_clips(offers: list[Offer | None], taken_keys: set[Hashable]) -> list[list[int]]:
    """Which clips of one round each process adds to the real set: ``offers[rank]`` is that process's
    offer (None: it offers nothing). A clip whose key was taken before, or by a lower rank or an earlier
    position in this round, is left out; a clip without a key (None) cannot be told apart and is always
    new. ``taken_keys`` gains the keys taken."""
    taken: list[list[int]] = []
    for offer in offers:
        positions: list[int] = []
        keys, room = (offer.keys, offer.room) if offer is not None else ([], 0)
        for position, key in enumerate(keys):
            if len(positions) == room:
                break
            if key is None or key not in taken_keys:
                positions.append(position)
                if key is not None:
                    taken_keys.add(key)
        taken.append(positions)
    return taken


def _decode_in_step(offers: list[Offer | None], taken: list[list[int]], pl_module: LightningModule) -> None:
    """Decode a blank clip when another process decodes latents in this round: a codec sharded over the
    processes (DeepSpeed ZeRO-3) gathers its weights from all of them in every decode."""
    for offer, positions in zip(offers, taken):
        if positions and offer is not None and offer.latent_shape is not None:
            with torch.no_grad():
                pl_module.codec.decode(torch.zeros(1, *offer.latent_shape, device=pl_module.device))
            return


def _batch_keys(batch: dict[str, Any]) -> list[Hashable | None]:
    if "key" not in batch:
        return [None] * len(_clips(batch))
    keys = batch["key"]
    return keys.tolist() if isinstance(keys, torch.Tensor) else list(keys)  # a tensor's items hash by identity


def _pick(batch: dict[str, Any], positions: list[int]) -> dict[str, Any]:
    """The samples at ``positions`` of a collated batch (tensors and lists; anything else as it is)."""
    picked: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value[positions]
        elif isinstance(value, (list, tuple)):
            value = [value[i] for i in positions]
        picked[name] = value
    return picked


def _gather_objects(trainer: Trainer, value: Any) -> list[Any]:
    """``value`` of every process, in rank order."""
    if trainer.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def real_videos(batch: dict[str, Any], pl_module: LightningModule) -> torch.Tensor:
    """uint8 videos of a validation batch: its ``latents`` through ``pl_module.codec``, else its ``video``."""
    clips = _clips(batch).to(pl_module.device)
    if "latents" in batch:
        with torch.no_grad():
            return pl_module.codec.decode(clips)
    return clips


def _clips(batch: dict[str, Any]) -> torch.Tensor:
    """A validation batch's ``latents``, else its ``video``."""
    for name in ("latents", "video"):
        if name in batch:
            return batch[name]
    raise ValueError(f"FVDCallback(reference='val') needs validation batches with 'latents' or 'video'; got keys {sorted(batch)}")


def _validation_batches(trainer: Trainer) -> Iterator[dict[str, Any]]:
    loaders = trainer.val_dataloaders
    if loaders is None:  # validation has not run yet (no sanity check): prepare its data as Lightning would
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError("FVDCallback(reference='val') needs validation data (a val dataloader and a validation_step); "
                         "or give reference statistics from `flowvid data fvd-stats`")
    return iter(loaders)
