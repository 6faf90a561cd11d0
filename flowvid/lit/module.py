"""FlowModule: trains a GlobalLocalFlow by maximum likelihood and its causal denoiser by flow-score matching.

One training step:

1. latents: the batch's ``latents``, or its uint8 ``video`` through the frozen codec;
2. task and noise: video-to-video or extension (``conditioning.py``), then ``x~ = x + sigma * eps``,
   then the caption is dropped with probability ``text_dropout`` (for classifier-free guidance);
3. likelihood: ``loss = mean_b[0.5 * mean(z^2) - logdet / D]`` (+ a latent-norm penalty), with one
   backward pass per step;
4. flow-score matching: the gradient that this backward pass leaves on ``x~``, rescaled, is the
   denoiser's target ``sigma * grad NLL(x~)``, and the same pass trains the denoiser towards it
   (``flowvid.denoise.score_matching_tap``); the denoiser sees ``x~`` and the text detached, so no
   gradient of its loss reaches the flow or the text encoder;
5. update: each parameter group is clipped on its own; a step whose loss or gradients are not finite,
   or whose flow gradient norm exceeds ``skip_threshold``, is skipped and counted
   (``train/skipped_steps``); otherwise one AdamW step, the schedule, and the EMA.

The flow and the denoiser share one AdamW with two parameter groups (their own learning rates and
betas) rather than two optimisers: Lightning counts every optimiser step as a global step, and
DeepSpeed accepts a single optimiser. A single backward pass gives both their gradients, so DDP and
DeepSpeed ZeRO reduce them once per step, as they expect.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shlex
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flowvid.checks import check_count, check_positive, is_count, is_integer
from flowvid.codecs.base import LatentCodec, check_codec_identity
from flowvid.denoise import CausalDenoiser, flow_score_target, score_matching_tap, tweedie_denoise
from flowvid.flows.global_local import LOG_2PI, GlobalLocalFlow
from flowvid.lit.checkpointing import (checkpoint_dir_of, forget_divergence, has_run_checkpoint, list_checkpoints,
                                       record_divergence, recorded_skips_in_a_row)
from flowvid.lit.conditioning import EXTEND_PREFIX, V2V_PREFIX, add_prefix, chance, drop_captions
from flowvid.lit.data_skips import SkippedSamples
from flowvid.lit.ema import EMA
from flowvid.lit.resumed_settings import check_resumed_settings
from flowvid.lit.schedule import warmup_cosine_scheduler
from flowvid.lit.step_axis import log_training_point
from flowvid.lit.strategies import ZeroStrategy, discard_gradients
from flowvid.lit.tensorboard import COMPARED_METRIC, compare_runs_by
from flowvid.nn.lora import LoRALinear, is_adapter_key, merge_lora
from flowvid.placement import warn_if_bf16_is_emulated
from flowvid.registry import CODECS
from flowvid.sampling.base import Sampler, build_sampler
from flowvid.text.base import TextEmbedding, TextEncoder
from flowvid.text.learned import LearnedTextEncoder
from flowvid.text.vocabulary import REFUSED_UNKNOWN_SHARE, coverage

log = logging.getLogger("flowvid.train")

#: A run that skips this many steps in a row is broken, not unlucky: stop it with an error.
MAX_CONSECUTIVE_SKIPS = 50
#: Captions read from the start of each training folder to check a learned text encoder's vocabulary:
#: enough to meet a folder's common words, few enough to read at once.
VOCABULARY_CHECK_CAPTIONS = 256


class TrainingDiverged(RuntimeError):
    """``MAX_CONSECUTIVE_SKIPS`` optimiser steps in a row were skipped: an expected stop of a diverged run,
    whose message says what to change, so ``flowvid fit`` reports it in one line."""


PREDICT_REFUSED = ("FlowModule does not run under trainer.predict: sample with module.generate_videos(captions, "
                   "seed=...), or with flowvid generate")


def check_compilable(strategy) -> None:
    """``compile_flow`` under ZeRO-3 would compile around the hooks that gather each sharded parameter."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 3:
        raise ValueError("compile_flow does not work with ZeRO-3 (its hooks gather parameters during the "
                         "forward pass); use ZeRO-2 or DDP, or leave compile_flow off")


def check_validation_in_step(strategy, world_size: int, datamodule) -> None:
    """Under ZeRO-3 every forward pass gathers the weights from all processes, so a process with more
    validation batches than the others would wait for them forever: the batches per process must be
    fixed (``val_batches``), since shards hold different numbers of clips."""
    if (world_size > 1 and getattr(strategy, "zero_stage_3", False) and getattr(datamodule, "val_dirs", None)
            and getattr(datamodule, "val_batches", 0) is None):
        raise ValueError(f"under ZeRO-3 on {world_size} processes every process must run the same number of "
                         "validation batches (each forward pass gathers the weights from all of them): set "
                         "data.init_args.val_batches")


def validation_noise(keys: list[Any] | None, shape: torch.Size, batch_idx: int) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) for a validation batch. A clip's noise is drawn from a seed
    its key gives, so it is the same whichever batch and process the clip falls to; batches without keys
    draw from their index."""
    if keys is None:
        return torch.randn(shape, generator=torch.Generator().manual_seed(batch_idx))
    keys = keys.tolist() if isinstance(keys, torch.Tensor) else keys
    seeds = [int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little") for key in keys]
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def check_hyperparameters(*, noise_std: float, lr: float, denoiser_lr: float, grad_clip: float | None,
                          skip_threshold: float | None, min_lr: float, text_dropout: float, extend_prob: float,
                          v2v_prob: float, schedule_steps: int | None, accumulate_grad_batches: int,
                          warmup_steps: int, guidance: float, latent_norm_penalty: float, weight_decay: float,
                          has_text_encoder: bool, **parts_and_shapes: Any) -> None:
    """Raise a ValueError for the first of FlowModule's settings out of its range, naming it, before anything
    is built on it. The parts and shapes are checked against each other once they are built."""
    for name, value in (("noise_std", noise_std), ("lr", lr), ("denoiser_lr", denoiser_lr)):
        check_positive(name, value)
    # A negative clip norm turns the step round (the loss climbs); zero would mean "no clipping" silently.
    for name, value in (("grad_clip", grad_clip), ("skip_threshold", skip_threshold)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, or null for none, got {value}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
    for name, value in (("text_dropout", text_dropout), ("extend_prob", extend_prob), ("v2v_prob", v2v_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    if schedule_steps is not None and not (is_count(schedule_steps) and schedule_steps >= 1):
        raise ValueError(f"schedule_steps must be an integer >= 1, or null for the run's planned steps, "
                         f"got {schedule_steps!r}")
    check_count("accumulate_grad_batches", accumulate_grad_batches)
    check_count("warmup_steps", warmup_steps, minimum=0)
    for name, value in (("guidance", guidance), ("latent_norm_penalty", latent_norm_penalty),
                        ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):  # a negative penalty rewards latents that blow up
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if guidance > 0 and not has_text_encoder:  # else the first sample logged mid-training would fail
        raise ValueError(f"guidance={guidance} needs a text encoder: a model without one has no caption to "
                         "guide towards; set guidance: 0")


class FlowModule(LightningModule):
    """Trains a ``GlobalLocalFlow`` (and optionally a ``CausalDenoiser``) on latent or raw-video batches.

    Args:
        flow: the flow.
        codec: maps uint8 video to the flow's latents and back; default ``PixelCodec()``.
        text_encoder: captions to token states; required exactly when the flow is text-conditioned.
        denoiser: trained jointly by flow-score matching; without one, sampling ends with a Tweedie
            step through the flow.
        video_shape: (frames, height, width) of the clips the model trains on and generates.
        sampler: the sampler of ``generate_videos``: a registered name, or a mapping with ``name`` or
            ``class_path`` and ``init_args`` (``flowvid.sampling.build_sampler``).
        guidance: classifier-free guidance weight for ``generate_videos``.
        noise_std: sigma of the Gaussian noise added to the latents.
        text_dropout: probability of replacing a caption by ``""``.
        extend_prob: probability that a batch trains extension (first latent frame dropped).
        v2v_prob: probability that a batch with a source clip (``source_latents`` / ``source_video``)
            trains video-to-video; other batches train on their target clip alone.
        latent_norm_penalty: weight of ``sum_blocks mean(h^2)`` over the shallow blocks' outputs.
        lr, denoiser_lr: peak learning rates of the flow (and text encoder) and of the denoiser.
        weight_decay: AdamW weight decay of both groups.
        warmup_steps, schedule_steps, min_lr: linear warm-up, then cosine to ``min_lr`` at
            ``schedule_steps`` (default: the optimiser steps the run will take). A run resumed with
            another length of schedule (a larger ``max_steps``) warns; setting ``schedule_steps``
            keeps the length. A warm-up of at least ``schedule_steps`` is refused; a run no longer
            than its warm-up (its own length sizing the schedule) is warned of.
        grad_clip: max gradient norm of each group; None for no clipping. Under DeepSpeed the engine
            clips the global norm of both groups together.
        skip_threshold: skip steps whose flow gradient norm (before clipping) exceeds it; None skips
            only non-finite steps.
        ema_decay: keep an exponential moving average of the weights for validation and sampling.
        accumulate_grad_batches: take an optimiser step after this many batches, with their gradients
            averaged (Lightning's ``trainer.accumulate_grad_batches`` applies only to automatic
            optimisation). Steps, ``max_steps``, schedules and checkpoints count optimiser steps.
        compile_flow: compile the forward pass of every flow block with ``torch.compile`` when training
            starts (training and validation; samplers run the blocks eagerly). The first steps pay the
            compilation; the state dict is unchanged. Not with ZeRO-3, whose parameter hooks it breaks.
    """

    def __init__(
        self,
        flow: GlobalLocalFlow,
        codec: LatentCodec | None = None,
        text_encoder: TextEncoder | None = None,
        denoiser: CausalDenoiser | None = None,
        video_shape: tuple[int, int, int] = (8, 16, 16),
        sampler: str | dict[str, Any] = "jacobi",
        guidance: float = 0.0,
        noise_std: float = 0.3,
        text_dropout: float = 0.1,
        extend_prob: float = 0.0,
        v2v_prob: float = 0.0,
        latent_norm_penalty: float = 0.0,
        lr: float = 1e-4,
        denoiser_lr: float = 1e-4,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        schedule_steps: int | None = None,
        min_lr: float = 1e-6,
        grad_clip: float | None = 1.0,
        skip_threshold: float | None = None,
        ema_decay: float | None = None,
        accumulate_grad_batches: int = 1,
        compile_flow: bool = False,
    ):
        super().__init__()
        # Under LightningCLI the hyperparameters are the parsed config, class_path and init_args of
        # every sub-module included, so ``load_from_checkpoint(path)`` rebuilds the whole model. Built
        # in Python, the sub-modules are objects: their weights are in the state dict, not here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if isinstance(v, nn.Module)])
        self.automatic_optimization = False

        self.flow = flow
        self.codec = codec if codec is not None else CODECS.get("pixel")()
        self.codec.requires_grad_(False)
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        # A float would be truncated: 8.5 frames would train on 8 without a word.
        if len(video_shape) != 3 or not all(is_integer(s) and s >= 1 for s in video_shape):
            raise ValueError(f"video_shape is (frames, height, width), each >= 1, got {list(video_shape)} "
                             "(whole numbers of frames and pixels)")
        self.video_shape = tuple(int(s) for s in video_shape)
        self.latent_shape = tuple(self.codec.latent_shape(*self.video_shape))
        check_hyperparameters(**self.hparams, has_text_encoder=text_encoder is not None)
        build_sampler(sampler)  # a sampler that cannot be built fails here, not at the first logged sample
        self._check_parts_fit()
        if denoiser is not None:
            if denoiser.noise_std is not None and not math.isclose(denoiser.noise_std, noise_std):
                raise ValueError(f"the denoiser was built for noise_std={denoiser.noise_std}, "
                                 f"but the model adds noise_std={noise_std}")
            denoiser.noise_std = noise_std

        self.sampler_spec = sampler
        self.guidance = guidance
        self.noise_std = noise_std
        self.text_dropout = text_dropout
        self.extend_prob = extend_prob
        self.v2v_prob = v2v_prob
        self.latent_norm_penalty = latent_norm_penalty
        self.ema = EMA(self, ema_decay) if ema_decay is not None else None
        self.skipped_steps = 0
        # Latent tokens and videos trained on by all processes together (TrainingThroughput logs them).
        self.tokens_seen = 0
        self.videos_seen = 0
        self._consecutive_skips = 0
        self._window_problem: str | None = None  # why the current accumulation window cannot step
        # The values of the window's batches, logged as their mean when it closes (see step_axis.log_training_point).
        self._window_values: dict[str, list[torch.Tensor]] = {}
        self._divergence_restored = False  # the count in a row came from a diverged stop's record
        # Batches of the run before this fit started (restored on resuming): accumulation windows count
        # from there, so that a run resumed with another accumulate_grad_batches steps on whole windows.
        self.accumulation_start = 0
        self._checked_captions = False
        # Optimiser steps the learning-rate schedule spans: this run's (set with the optimiser) and
        # that of the checkpoint it resumes from, if that recorded one.
        self.schedule_length: int | None = None
        self._resumed_schedule_length: int | None = None
        self.skipped_samples = SkippedSamples()  # by the data module, over all ranks and resumes
        # Validation is logged at the optimizer step of the weights it measures (see on_validation_end).
        self._validation_names: set[str] = set()
        self._checkpoint_step: int | None = None
        self._runs_comparable = False  # the settings are written for TensorBoard's HPARAMS tab (on_validation_end)

    def _check_parts_fit(self) -> None:
        """The codec, flow, text encoder and denoiser must agree on sizes: fail at construction."""
        flow = self.flow
        latent = (*flow.frame_size, flow.latent_channels)
        if tuple(self.latent_shape[1:]) != latent:
            raise ValueError(f"codec {self.codec.name!r} turns {self.video_shape} clips (frames, height, width) into "
                             f"latents {self.latent_shape}, but the flow models frames of (h, w, c) = {latent}")
        if (flow.text_width is None) != (self.text_encoder is None):
            raise ValueError("a text-conditioned flow needs a text_encoder, an unconditional one takes none "
                             f"(flow text_width={flow.text_width}, text_encoder={type(self.text_encoder).__name__})")
        if self.text_encoder is not None and self.text_encoder.width != flow.text_width:
            raise ValueError(f"the text encoder gives width {self.text_encoder.width}, "
                             f"the flow expects text_width={flow.text_width}")
        denoiser = self.denoiser
        if denoiser is not None:
            if (denoiser.frame_size, denoiser.channels) != (flow.frame_size, flow.latent_channels):
                raise ValueError(f"the denoiser works on frames {denoiser.frame_size} x {denoiser.channels} channels, "
                                 f"the flow on {flow.frame_size} x {flow.latent_channels}")
            if denoiser.text_width is not None and denoiser.text_width != flow.text_width:
                raise ValueError(f"the denoiser expects text_width={denoiser.text_width}, "
                                 f"the text encoder gives {flow.text_width}")

    def train(self, mode: bool = True) -> "FlowModule":
        super().train(mode)
        self.codec.eval()  # frozen: never in training mode (dropout, batch statistics)
        if self.text_encoder is not None and not self.text_encoder.trainable:
            self.text_encoder.eval()  # its embeddings must be those cached in shards and seen when sampling
        return self

    # --- inputs --------------------------------------------------------------------------------

    def latents_of(self, batch: dict[str, Any], key: str = "") -> torch.Tensor:
        """Clean latents (B, t, h, w, c) of ``batch[key + "latents"]`` or ``batch[key + "video"]``."""
        if key + "latents" in batch:
            return batch[key + "latents"].float()
        if key + "video" in batch:
            with torch.no_grad():
                return self.codec.encode(batch[key + "video"]).float()
        raise ValueError(f"a batch needs {key + 'latents'!r} or {key + 'video'!r}; got keys {sorted(batch)}")

    def encode_text(self, captions: list[str]) -> TextEmbedding | None:
        if self.text_encoder is None:
            return None
        return self.text_encoder.encode(captions).to(self.device)

    def captions_of(self, batch: dict[str, Any]) -> list[str]:
        captions = batch.get("caption")
        if self.text_encoder is not None and not self._checked_captions:
            if captions is None or not any(captions):
                raise ValueError("the flow is text-conditioned but the batches carry no captions "
                                 "(key 'caption' missing or every caption empty); train an unconditional flow "
                                 "(text_width=None, no text_encoder) or add captions to the shards")
            self._checked_captions = True
        return list(captions) if captions is not None else []

    def training_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, TextEmbedding | None]:
        """Noisy latents of the batch's task and the text they are conditioned on."""
        clean = self.latents_of(batch)
        captions = self.captions_of(batch)
        prefix = ""
        if self.v2v_prob > 0 and "source_latents" not in batch and "source_video" not in batch:
            # Checked on every batch, not only the drawn ones: a rare draw would stop the run far into it.
            raise ValueError("v2v_prob > 0 needs batches with a source clip ('source_latents' or 'source_video'); "
                             "make the shards with source clips, or set v2v_prob: 0")
        if chance(self.v2v_prob):
            clean = torch.cat([self.latents_of(batch, "source_"), clean], dim=1)
            prefix = V2V_PREFIX
        noisy = clean + self.noise_std * torch.randn_like(clean)
        if clean.shape[1] > 1 and chance(self.extend_prob):
            noisy = noisy[:, 1:]
            prefix = EXTEND_PREFIX
        if self.text_encoder is None:
            return noisy, None
        captions, kept = drop_captions(captions, self.text_dropout)
        if not prefix and "text_tokens" in batch:  # cached embeddings of the plain captions
            text = self._cached_text(batch, kept)
        else:
            text = self.encode_text(add_prefix(captions, prefix))
        return noisy, text

    def _cached_text(self, batch: dict[str, Any], kept: torch.Tensor) -> TextEmbedding:
        """The batch's cached text states; dropped captions take the empty caption's states."""
        tokens, mask = batch["text_tokens"].float(), batch["text_mask"].bool()
        empty = self.encode_text([""])
        if empty.tokens.shape[1:] != tokens.shape[1:]:
            raise ValueError(f"cached text states {tuple(tokens.shape[1:])} do not match the text encoder's "
                             f"{tuple(empty.tokens.shape[1:])}")
        kept = kept.to(tokens.device)
        tokens = torch.where(kept[:, None, None], tokens, empty.tokens.to(tokens.dtype))
        mask = torch.where(kept[:, None], mask, empty.mask)
        return TextEmbedding(tokens, mask)

    # --- losses --------------------------------------------------------------------------------

    def likelihood_terms(self, x: torch.Tensor, text: TextEmbedding | None) -> dict[str, torch.Tensor]:
        """The MLE loss and its parts, all per dimension and averaged over the batch.

        ``loss = z2 - logdet (+ penalty)``, with ``z2 = 0.5 mean(z^2)`` and ``logdet = log|det| / D``;
        ``nats_per_dim = z2 - logdet + 0.5 ln(2 pi)`` is the NLL of the noisy latents. ``sigma`` holds
        (mean, min, max) of each block's scales.
        """
        with record_block_outputs(self.flow) as outputs:
            z, logdet = self.flow(x, text)
        dims = x[0].numel()
        z2 = 0.5 * z.pow(2).flatten(1).mean(1).mean()
        logdet = (logdet / dims).mean()
        penalty = sum(h.pow(2).mean() for h, _ in outputs[:-1]) if self.latent_norm_penalty else z2.new_zeros(())
        with torch.no_grad():
            sigma = torch.stack([torch.stack([s.mean(), s.min(), s.max()])
                                 for s in (torch.exp(-block_logdet) for _, block_logdet in outputs)])
        return {
            "loss": z2 - logdet + self.latent_norm_penalty * penalty,
            "z2": z2,
            "logdet": logdet,
            "penalty": penalty,
            "nats_per_dim": z2 - logdet + 0.5 * LOG_2PI,
            "sigma": sigma,
        }

    def denoiser_prediction(self, x_noisy: torch.Tensor, text: TextEmbedding | None) -> torch.Tensor:
        """The denoiser's output for ``x~``; nothing upstream of it (flow, text encoder) gets a gradient."""
        assert self.denoiser is not None
        if text is not None:
            text = TextEmbedding(text.tokens.detach(), text.mask)
        return self.denoiser(x_noisy.detach(), text)

    # --- training ------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        opens, closes = self._accumulation_window()
        if opens:
            optimizer.zero_grad(set_to_none=True)
            self._window_problem = None
            self._window_values = {}
        if self._window_problem is None:  # after a bad batch, the rest of its window is not computed
            problem = self._accumulate_gradients(batch)
            if problem is not None:  # named now: the window is skipped at its last batch
                self._window_problem = f"{problem} in batch {batch_idx} of epoch {self.current_epoch}"
        if self._window_problem is not None:
            # This batch trained nothing; unlogged, Lightning would show the loss of the batch before it.
            self.log_dict({"train/loss": math.nan, "train/bits_per_dim": math.nan}, batch_size=1, logger=False)
        if closes:
            self._step(optimizer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # DDP reduces gradients in every backward pass it prepared for in its forward pass: within a
        # window only the last one needs it (the others' gradients add up locally, as with no_sync).
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = self._accumulation_window()[1]

    def _accumulation_window(self) -> tuple[bool, bool]:
        """Whether this batch opens and whether it closes a window of ``accumulate_grad_batches`` batches."""
        size = self.hparams.accumulate_grad_batches
        # Batches of the whole run, this one included, are restored on resume; checkpoints end windows.
        index = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 - self.accumulation_start
        return index % size == 0, index % size == size - 1

    def _accumulate_gradients(self, batch: dict[str, Any]) -> str | None:
        """Add the batch's gradients and log its losses; the reason the window must be skipped, if any."""
        x, text = self.training_inputs(batch)
        if not self._on_all_ranks(torch.isfinite(x).all()):
            return "non-finite values in the batch's latents"
        if text is not None and not self._on_all_ranks(torch.isfinite(text.tokens).all()):
            return "non-finite text states (the text encoder's output)"
        # Each batch's loss weighs 1/k: the window's gradients add up to their mean, on every strategy.
        scale = 1.0 / self.hparams.accumulate_grad_batches
        flow_input = x
        if self.denoiser is not None:
            x.requires_grad_(True)
            prediction = self.denoiser_prediction(x, text)
            flow_input = score_matching_tap(x, prediction, self.noise_std, scale)
        terms = self.likelihood_terms(flow_input, text)
        # Trains the flow, the text encoder and the denoiser.
        self.manual_backward(terms["loss"] * scale if scale != 1.0 else terms["loss"])
        self._count_seen(x)
        metrics = {f"train/{name}": terms[name] for name in ("loss", "nats_per_dim", "z2", "logdet")}
        metrics["train/bits_per_dim"] = terms["nats_per_dim"] / math.log(2)
        if self.latent_norm_penalty:
            metrics["train/latent_norm"] = terms["penalty"]
        healthy = torch.isfinite(terms["loss"])

        if self.denoiser is not None:
            # x.grad is this batch's own: x is new in every batch, whatever the window holds.
            den_loss = F.mse_loss(prediction.detach(), flow_score_target(x.grad / scale, self.noise_std))
            metrics["train/denoiser_loss"] = den_loss
            healthy &= torch.isfinite(den_loss)
        if not self._on_all_ranks(healthy):
            return "non-finite loss"
        metrics.update(self._sigma_metrics(terms["sigma"]))
        # Each batch's values for callbacks (trainer.callback_metrics); the loggers get the window's mean.
        self.log_dict(metrics, prog_bar=False, batch_size=x.shape[0], logger=False)
        self.log("train/loss_step", terms["loss"], prog_bar=True, logger=False, batch_size=x.shape[0])
        self._add_to_window(metrics)
        return None

    def _add_to_window(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self._window_values.setdefault(name, []).append(value.detach())

    def _window_means(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(values).mean() for name, values in self._window_values.items()}

    def _count_seen(self, x: torch.Tensor) -> None:
        """Add a batch of latents (B, t, h, w, c) to the totals; every process trains on as many."""
        world = self.trainer.world_size
        self.videos_seen += x.shape[0] * world
        self.tokens_seen += math.prod(x.shape[:-1]) * world

    @property
    def model_flops_per_token(self) -> float:
        """Training FLOPs per latent token of the flow and the denoiser: per parameter, 2 in the forward
        pass, 2 for its own gradient when it trains and 2 for the gradient of its input when one passes
        back through it. In the flow one always does when there is a denoiser (its target is the gradient
        on the noisy latents), else from the first block that trains on; the denoiser's input is
        detached, so only a denoiser that trains passes one. 6 x parameters when every weight trains,
        as in the usual convention."""
        def size(p: torch.Tensor) -> int:  # ZeRO-3 leaves each process a shard; ds_numel is the whole size
            return getattr(p, "ds_numel", p.numel())

        flops, gradient_passes = 0.0, self.denoiser is not None
        for block in self.flow.blocks:  # data-to-noise order
            parameters = list(block.parameters())
            gradient_passes = gradient_passes or any(p.requires_grad for p in parameters)
            flops += sum((2.0 + 2.0 * p.requires_grad + 2.0 * gradient_passes) * size(p) for p in parameters)
        if self.denoiser is not None:
            flops += sum((6.0 if p.requires_grad else 2.0) * size(p) for p in self.denoiser.parameters())
        return flops

    def _step(self, optimizer) -> None:
        """Clip the window's mean gradients and take the optimiser step, or skip the window."""
        step = self.global_step  # the step this window takes, or fails to take
        problem = self._window_problem
        if problem is None:
            norms = self._clip_groups(optimizer)
            # A frozen flow has no group, and no gradient norm to hold against the threshold.
            flow_norm = norms.get("flow")
            too_large = (self.hparams.skip_threshold is not None and flow_norm is not None
                         and bool(flow_norm > self.hparams.skip_threshold))
            if not self._on_all_ranks(torch.stack(list(norms.values())).isfinite().all()):
                problem = f"non-finite gradients of {self._window_batches()}"
            elif too_large:
                problem = (f"gradient norm {float(flow_norm):.4g} above skip_threshold "
                           f"{self.hparams.skip_threshold:g} in {self._window_batches()}")
        if problem is not None:
            self._skip_step(problem, step)
            return

        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        # Under DeepSpeed the groups hold no gradients (the engine reduces and clips them in step()).
        metrics = {} if deepspeed else {f"train/{group}_grad_norm": norm for group, norm in norms.items()}
        # The rates this step uses: the scheduler moves them on for the next step.
        metrics.update({f"train/{group['name']}_lr": group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        if deepspeed and (norm := self.trainer.strategy.deepspeed_engine.get_global_grad_norm()) is not None:
            metrics["train/grad_norm"] = float(norm)
        self.lr_schedulers().step()
        if self.ema is not None:
            self.ema.update()
        self._consecutive_skips = 0
        if self._divergence_restored:
            self._forget_divergence()
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        metrics.update(self.skipped_samples.metrics(self.trainer, self.device))
        self.log_dict(metrics, prog_bar=False, batch_size=1, logger=False)
        log_training_point(self.trainer, {**self._window_means(), **metrics}, step)

    def _window_batches(self) -> str:
        """The batches of the window that closes now, for messages."""
        last = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        size = self.hparams.accumulate_grad_batches
        batches = f"batch {last}" if size == 1 else f"the {size} batches up to batch {last}"
        return f"{batches} of epoch {self.current_epoch}"

    def _clip_groups(self, optimizer) -> dict[str, torch.Tensor]:
        """Clip each parameter group to ``grad_clip`` on its own; return each group's norm before clipping.

        Parameters without a gradient (none under DeepSpeed, which clips inside its engine) are left out.
        """
        norms = {}
        max_norm = self.hparams.grad_clip or float("inf")
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            norms[group["name"]] = (torch.nn.utils.clip_grad_norm_(params, max_norm) if params
                                    else torch.zeros((), device=self.device))
        return norms

    def _skip_step(self, reason: str, step: int) -> None:
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            discard_gradients(self.trainer.strategy.deepspeed_engine)
        else:
            self.optimizers().zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._consecutive_skips += 1
        # The optimiser step does not advance while steps are skipped: the batch and the count in a row do.
        log.warning("skipped an optimiser step: %s; %d in a row (the run stops at %d), %d in all", reason,
                    self._consecutive_skips, MAX_CONSECUTIVE_SKIPS, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1, logger=False)
        log_training_point(self.trainer, {"train/loss": math.nan, "train/bits_per_dim": math.nan,
                                          "train/skipped_steps": float(self.skipped_steps)}, step)
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            self._record_divergence(reason)
            raise TrainingDiverged(
                f"stopped at step {self.global_step}: {self._consecutive_skips} optimiser steps in a row were "
                f"skipped (last: {reason}); lower the learning rate, check the data (flowvid data verify DIR) or "
                f"raise skip_threshold, then {self._how_to_continue()}")

    def _how_to_continue(self) -> str:
        newest = list_checkpoints(checkpoint_dir_of(self.trainer))
        if not newest:
            return "run it again: it saved no checkpoint, so it starts from scratch"
        return f"continue from the run's last good checkpoint ({newest[-1].name}) with --resume auto"

    def _record_divergence(self, reason: str) -> None:
        """Leave the stop's count in a row in the checkpoint folder: the stop saves no checkpoint (the step did
        not advance), so a restart from the last good one would otherwise count from 0 and skip fifty more."""
        if self.trainer.is_global_zero and has_run_checkpoint(self.trainer):
            record_divergence(checkpoint_dir_of(self.trainer), self.global_step, self._consecutive_skips, reason)

    def _resume_skips_in_a_row(self) -> None:
        """A run that starts at the step a diverged stop recorded continues its count in a row (the
        checkpoint it resumes from was saved before those skips); at any other step the count stands."""
        if not has_run_checkpoint(self.trainer):
            return
        recorded = recorded_skips_in_a_row(checkpoint_dir_of(self.trainer), self.global_step)
        # Every process must count alike, or one would stop alone: the first process's reading counts.
        recorded = self.trainer.strategy.broadcast(recorded, src=0)
        if recorded > self._consecutive_skips:
            self._consecutive_skips, self._divergence_restored = recorded, True

    def _forget_divergence(self) -> None:
        """A step succeeded after a restored count: a later restart at that step must count from 0."""
        self._divergence_restored = False
        if self.trainer.is_global_zero:
            forget_divergence(checkpoint_dir_of(self.trainer))

    def _on_all_ranks(self, condition: torch.Tensor) -> bool:
        """True only when ``condition`` holds on every rank, so that all ranks take the same branch.

        One all-reduce of the flag where it lies and one wait for its value: Lightning's
        ``reduce_boolean_decision`` waits twice and adds a barrier, twice a step (a warning each time
        under NCCL).
        """
        if self.trainer.world_size == 1:
            return bool(condition)
        flag = condition.detach().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _sigma_metrics(self, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [f"shallow{i}" for i in range(len(self.flow.shallow))] + ["deep"]
        metrics = {}
        for name, (mean, low, high) in zip(names, sigma):
            metrics.update({f"sigma/{name}_mean": mean, f"sigma/{name}_min": low, f"sigma/{name}_max": high})
        return metrics

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # One fused kernel over all parameters instead of ten small ones per tensor (CPU and GPU).
        optimizer = torch.optim.AdamW(self._parameter_groups(), weight_decay=hp.weight_decay, fused=True)
        self.schedule_length = self._schedule_length()
        scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_steps, self.schedule_length, hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The ``flow`` (text encoder included) and ``denoiser`` groups, each only if something in it trains.

        A group that a ``Freeze`` left empty is left out: DeepSpeed drops empty groups, and the
        schedule, which has one rate function per group, would then no longer match the optimiser.
        """
        hp = self.hparams
        flow_params = [p for name, p in self.named_parameters()
                       if p.requires_grad and not name.startswith(("denoiser.", "codec."))]
        groups = [{"name": "flow", "params": flow_params, "lr": hp.lr, "betas": (0.9, 0.95)}]
        if self.denoiser is not None:
            groups.append({"name": "denoiser", "params": [p for p in self.denoiser.parameters() if p.requires_grad],
                           "lr": hp.denoiser_lr, "betas": (0.9, 0.999)})
        return [group for group in groups if group["params"]]

    def _schedule_length(self) -> int:
        total = self.hparams.schedule_steps
        if total is None:
            total = self._planned_steps()
        if not math.isfinite(total):
            raise ValueError("cannot size the learning-rate schedule: set trainer.max_steps or schedule_steps")
        return int(total)

    def _planned_steps(self) -> float:
        """Optimiser steps the run will take: ``max_steps`` counts them, the epochs end after their batches,
        of which every ``accumulate_grad_batches`` make a step. Windows run on across epochs, and batches
        left over at the end of the run fill no window and take no step. (Lightning's estimate, under manual
        optimisation, is batches capped by ``max_steps``: with accumulation it mixes the two units.)"""
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else math.inf
        batches = self._planned_batches()
        if not math.isfinite(batches):
            return max_steps
        whole_windows = batches // self.hparams.accumulate_grad_batches
        # A run too short for one window still needs a schedule to build; on_fit_start refuses it.
        return min(max_steps, max(1, whole_windows))

    def _planned_batches(self) -> float:
        """Training batches of the run, all epochs together; infinite when no number of epochs ends it."""
        self.trainer.fit_loop.setup_data()  # the training data, whose batches are counted
        epochs, batches = self.trainer.max_epochs, self.trainer.num_training_batches
        if epochs is None or epochs < 0 or not math.isfinite(batches):
            return math.inf
        return batches * epochs

    # --- checks before the first step ------------------------------------------------------------

    def on_fit_start(self) -> None:
        # The optimiser and its schedule are built, and no batch has trained yet.
        if self.schedule_length is None:
            raise TypeError(f"{type(self).__name__}.configure_optimizers must return what "
                            "FlowModule.configure_optimizers returns (call super() and adjust it): the training step "
                            "clips, logs and schedules its 'flow' and 'denoiser' parameter groups itself")
        self._check_a_window_fits()
        self._check_warmup_fits()

    def _check_a_window_fits(self) -> None:
        """Every window steps at its last batch: a run of fewer batches than one would train nothing."""
        window, batches = self.hparams.accumulate_grad_batches, self._planned_batches()
        if 0 < batches < window:
            more = f"--trainer.fast_dev_run {window}" if self.trainer.fast_dev_run else "more data or epochs"
            raise ValueError(f"the run has {batches} training batches, fewer than one accumulation window of "
                             f"accumulate_grad_batches={window}, so it would take no optimiser step: lower "
                             f"accumulate_grad_batches to {batches} or less, or give it {window} batches ({more})")

    def _check_warmup_fits(self) -> None:
        """A warm-up as long as a fixed schedule leaves the cosine no steps: the rate would climb to its peak
        and fall straight to ``min_lr``. A schedule that spans the run ends with it, so a run shorter than
        its warm-up (a trial run with a lowered ``max_steps``) only never leaves the warm-up: it is warned of."""
        warmup, length = self.hparams.warmup_steps, self.schedule_length
        if warmup < length:
            return
        if self.hparams.schedule_steps is not None:
            raise ValueError(f"warmup_steps={warmup} is not shorter than schedule_steps={length}: the learning rate "
                             f"would climb to its peak and then drop straight to min_lr; lower warmup_steps below "
                             f"{length} or raise schedule_steps above {warmup}")
        if not self.trainer.fast_dev_run:
            rank_zero_warn(f"the run takes {length} optimiser steps, no more than warmup_steps={warmup}: the learning "
                           "rate stays in its warm-up and never decays (fine for a trial run); for a real run make it "
                           f"longer than {warmup} steps or lower warmup_steps below {length}")

    def configure_callbacks(self) -> list:
        """None of its own. Lightning calls this hook with the trainer attached and before it checks its loop
        settings, whose refusal of the Trainer options below says to switch to automatic optimisation: a
        FlowModule cannot, it has an option of its own for each."""
        trainer = self.trainer
        if trainer.state.fn != "fit":
            return []
        for option, value, unset, ours in (("accumulate_grad_batches", trainer.accumulate_grad_batches, 1,
                                            "accumulate_grad_batches"),
                                           ("gradient_clip_val", trainer.gradient_clip_val, None, "grad_clip")):
            if value != unset:
                raise ValueError(f"trainer.{option}={value} applies only to automatic optimisation; "
                                 f"{type(self).__name__} optimises itself: set model.init_args.{ours} "
                                 f"({type(self).__name__}({ours}={value}) in Python)")
        return []

    def setup(self, stage: str) -> None:
        if stage == "predict":  # refused here, before Lightning asks the data module for a predict_dataloader
            raise NotImplementedError(PREDICT_REFUSED)
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(f"precision {precision!r} is not supported: fp16 loss scaling would rescale the "
                             "flow-score-matching target; use 'bf16-mixed' or '32-true'")
        warn_if_bf16_is_emulated(precision, self.trainer.strategy.root_device)
        self._check_accumulation()
        trainer = self.trainer
        check_validation_in_step(trainer.strategy, trainer.world_size, getattr(trainer, "datamodule", None))
        # Only a fit steps; a recipe's threshold is no fault of a validation that shares its config.
        if (stage == "fit" and self.hparams.skip_threshold is not None
                and isinstance(self.trainer.strategy, DeepSpeedStrategy)):
            rank_zero_warn("skip_threshold is not applied under DeepSpeed: the engine holds the gradients and takes "
                           "their norm inside its step (grad_clip still clips, the global norm of both groups); set "
                           "skip_threshold: null to silence this")
        if self.hparams.compile_flow:
            check_compilable(self.trainer.strategy)
            # After the callbacks' setup (adapters and checkpointing are in); a second stage, such as
            # validate after fit, keeps the first one's compiled blocks.
            self.flow.compile_blocks()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "check_compatible"):
            datamodule.check_compatible(
                codec_identity=self.codec.identity(),
                latent_shape=self.latent_shape,
                video_shape=self.video_shape,
                text_encoder=self.text_encoder.identity() if self.text_encoder is not None else None,
            )
        if stage == "fit":
            self._check_vocabulary_knows_the_captions()

    def _check_vocabulary_knows_the_captions(self) -> None:
        """A learned text encoder reads every word outside its vocabulary as <unk>: trained on captions it mostly
        cannot read, the model comes out nearly unconditional, and nothing else would show it. The first
        captions of each training folder are read; they are the same on every rank, so every rank decides
        alike, and a resumed run as it did when it started."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(self.text_encoder, LearnedTextEncoder) or not hasattr(datamodule, "training_captions"):
            return
        captions_of = datamodule.training_captions(VOCABULARY_CHECK_CAPTIONS)
        folders = " ".join(map(shlex.quote, captions_of))
        written = f"flowvid data vocabulary {folders} --out vocabulary.yaml"
        fix = f"`{written}`, then `--config vocabulary.yaml` after the recipe"
        for folder, captions in captions_of.items():
            found = coverage(self.text_encoder.tokenizer, captions)
            if not found.unknown:
                continue
            said = (f"{found.unknown_percent()} of the words of the first {len(captions)} "
                    f"captions in {folder} are unknown to the learned text encoder's vocabulary and read as <unk> "
                    f"(most often: {found.most_frequent_unknown()})")
            if self._starts_from_an_export():
                rank_zero_warn(f"{said}; the vocabulary comes with the exported weights and cannot change: a model "
                               f"trained from scratch knows them with `--config vocabulary.yaml` after the recipe, "
                               f"written by `{written}`")
            elif found.unknown_share > REFUSED_UNKNOWN_SHARE:
                raise ValueError(f"{said}, so the model would learn to ignore its captions; give the encoder the "
                                 f"words of the captions: {fix}")
            else:
                rank_zero_warn(f"{said}; to make them known: {fix}")

    def _starts_from_an_export(self) -> bool:
        # Imported here: flowvid.lit.finetune imports flowvid.export, which imports this package.
        from flowvid.lit.finetune import InitFromExport

        return any(isinstance(callback, InitFromExport) for callback in self.trainer.callbacks)

    def _check_accumulation(self) -> None:
        strategy = self.trainer.strategy
        if self.hparams.accumulate_grad_batches == 1 or not isinstance(strategy, DeepSpeedStrategy):
            return
        from deepspeed.runtime.engine import DeepSpeedEngine

        if not isinstance(strategy, ZeroStrategy) or not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
            raise ValueError("accumulate_grad_batches > 1 under DeepSpeed needs flowvid.lit.strategies.ZeroStrategy "
                             "and a DeepSpeed with managed_gradient_accumulation (0.19 or later); raise the batch "
                             "size or the number of devices instead")

    # --- validation ----------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Bits/dim of noisy validation latents, and how far each denoiser lands from the clean ones.

        Each clip's noise is drawn from its key (``validation_noise``): the same in every validation run,
        whatever the batch size, the number of processes or the order, so numbers compare across runs.
        Bits/dim are logged for the video and for each latent frame given the ones before it
        (``bits_per_dim/frame_03``), which shows what the earlier frames' context buys. The first
        validation set logs ``val/...``; another logs ``val/<name>/...``, named by the DataModule's
        ``val_names`` when it has them.
        """
        clean = self.latents_of(batch)
        noisy = clean + self.noise_std * validation_noise(batch.get("key"), clean.shape, batch_idx).to(clean)
        batch_size = clean.shape[0]
        with self.averaged_weights():  # the text encoder is averaged too
            text = self.encode_text(self.captions_of(batch)) if self.text_encoder is not None else None
            per_frame = self.flow.nll_per_frame(noisy, text)  # (B, T) nats per dimension
            nats = per_frame.mean(dim=1).mean()
            metrics = {
                "nats_per_dim": nats,
                "bits_per_dim": nats / math.log(2),
                **{f"bits_per_dim/frame_{t:02d}": value / math.log(2) for t, value in enumerate(per_frame.mean(0))},
                "noisy_mse": F.mse_loss(noisy, clean),
                "tweedie_mse": F.mse_loss(tweedie_denoise(self.flow, noisy, self.noise_std, text), clean),
            }
            if self.denoiser is not None:
                metrics["denoiser_mse"] = F.mse_loss(self.denoiser.denoise(noisy, text), clean)
        prefix = self._validation_prefix(dataloader_idx)
        # A float count: Lightning averages each process's count of samples over the processes in the
        # count's own dtype, and an integer one rounds down (5 samples on 2 processes would count as 4).
        named = {f"{prefix}/{name}": value for name, value in metrics.items()}
        # Validating, Lightning logs the values itself: they are also what it prints and what
        # ``trainer.validate`` returns, which take only values given to the logger.
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        self.log_dict(named, batch_size=float(batch_size), sync_dist=True, add_dataloader_idx=False, logger=not fitting)
        if fitting:
            self._validation_names.update(named)

    def on_validation_start(self) -> None:
        # Validating a checkpoint: at the step of its weights (Lightning restores the step only when fitting,
        # and logs an evaluation at its count of batches that stepped, which has no public setter).
        if self.trainer.state.fn == TrainerFn.VALIDATING and self._checkpoint_step is not None:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self._checkpoint_step

    def on_validation_end(self) -> None:
        """During fit, the validation is logged at ``global_step``, the optimizer steps that made the weights it
        measured, which also names their checkpoint and is what the console prints. Lightning would log it at
        the count of batches whose step it logged, one less at this point (and batches, not steps, when
        gradients accumulate). The values are Lightning's averages over the batches and processes."""
        names, self._validation_names = self._validation_names, set()
        if self.trainer.sanity_checking or not names:
            return
        reduced = self.trainer.callback_metrics
        metrics = {name: float(reduced[name]) for name in sorted(names) if name in reduced}
        for logger in self.loggers:
            left = metrics
            if not self._runs_comparable and compare_runs_by(logger, dict(self.hparams), metrics, self.global_step):
                self._runs_comparable = True
                left = {name: value for name, value in metrics.items() if name != COMPARED_METRIC}  # logged with them
            logger.log_metrics(left, step=self.global_step)
            logger.save()

    def _validation_prefix(self, dataloader_idx: int) -> str:
        if dataloader_idx == 0:
            return "val"
        names = getattr(self.trainer.datamodule, "val_names", None)
        return f"val/{names[dataloader_idx] if names else f'dataloader_{dataloader_idx}'}"

    # --- sampling ------------------------------------------------------------------------------

    def predict_step(self, *args: Any, **kwargs: Any) -> None:
        """Refused: without it Lightning's ``trainer.predict`` would ask for a ``forward`` method."""
        raise NotImplementedError(PREDICT_REFUSED)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The EMA weights while inside, when the model keeps an EMA."""
        with self.ema.averaged() if self.ema is not None else nullcontext():
            yield

    def denoise(self, x_noisy: torch.Tensor, text: TextEmbedding | None = None) -> torch.Tensor:
        """One final denoising step: the learned denoiser, else a Tweedie step through the flow. A video
        that sampling left NaN or infinite stays so, and the others are denoised. The result is detached:
        the Tweedie step differentiates the flow, which a caller outside ``torch.no_grad`` would otherwise
        find in the returned tensor's graph."""
        if self.denoiser is not None:
            return self.denoiser.denoise(x_noisy, text).detach()
        finite = torch.isfinite(x_noisy).flatten(1).all(dim=1)
        if finite.all():
            return tweedie_denoise(self.flow, x_noisy, self.noise_std, text).detach()
        denoised = x_noisy.float().clone()  # the flow refuses non-finite input, so it sees the finite videos only
        if finite.any():
            denoised[finite] = tweedie_denoise(self.flow, x_noisy[finite], self.noise_std,
                                               None if text is None else text[finite])
        return denoised.detach()

    def denoise_stream(self, frames: Iterable[torch.Tensor], text: TextEmbedding | None = None
                       ) -> Iterator[torch.Tensor]:
        """``denoise`` of a video that arrives frame by frame: the learned denoiser yields each frame its
        ``lookahead`` frames behind; a Tweedie step reads every later frame, so without a denoiser the
        frames come once the last has arrived."""
        if self.denoiser is not None:
            yield from self.denoiser.denoise_stream(frames, text)
            return
        yield from self.denoise(torch.stack(list(frames), dim=1), text).unbind(1)

    def sampler(self) -> Sampler:
        """A fresh instance of the configured sampler."""
        return build_sampler(self.sampler_spec)

    @torch.no_grad()
    def generate_videos(self, captions: list[str], seed: int, denoise: bool = True) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) of ``video_shape`` for ``captions``, a torch tensor, the same for the
        same seed; ``denoise=False`` decodes the sampled latents without the final denoising step."""
        return self.codec.decode(self.sample_latents(captions, seed, denoise))

    def sample_latents(self, captions: list[str], seed: int, denoise: bool = True) -> torch.Tensor:
        """The latents that ``generate_videos`` decodes, denoised unless ``denoise=False``: NaN or infinite
        where a sample diverged."""
        from flowvid.sampling import GuidedText

        generator = torch.Generator().manual_seed(seed)
        z = torch.randn((len(captions), *self.latent_shape), generator=generator).to(self.device)
        with self.averaged_weights():  # the text encoder is averaged too
            text = self.encode_text(captions)
            condition = text
            if self.guidance > 0 and text is not None:
                condition = GuidedText(text, self.encode_text([""]))
            latents = self.sampler().sample(self.flow, z, condition, guidance=self.guidance)
            return self.denoise(latents, text) if denoise else latents

    # --- checkpoints ---------------------------------------------------------------------------

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None,
                             **kwargs: Any) -> "FlowModule":
        """Lightning's ``load_from_checkpoint``, saying what to do where it would fail bare: the checkpoint of
        a module built in Python holds its sub-modules' weights but not their settings (they were objects)."""
        try:
            return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only,
                                                **kwargs)
        except TypeError as err:
            # Lightning calls __init__ with the saved settings: only there can the one required argument be missing.
            if "flow" in kwargs or "required positional argument: 'flow'" not in str(err):
                raise
            raise TypeError(f"{checkpoint_path} holds no settings of the model's sub-modules (it was built in "
                            f"Python, not by `flowvid fit`): pass them again, {cls.__name__}.load_from_checkpoint("
                            "path, flow=..., codec=..., text_encoder=..., denoiser=...)") from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flowvid"] = {
            "codec": self.codec.identity(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,  # a diverged run stays stopped when restarted
            "tokens_seen": self.tokens_seen,
            "videos_seen": self.videos_seen,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            # What this run trains: adapter files carry the weights a LoRA run trained in full besides its adapters.
            "trained": sorted(name for name, parameter in self.named_parameters() if parameter.requires_grad),
            "schedule_length": self.schedule_length,
            # An all-reduce: Lightning saves on every rank. A module saved outside a Trainer has none.
            "data_skips": self.skipped_samples.state(self._trainer, self.device),
            "precision": str(self._trainer.precision) if self._trainer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = checkpoint.get("global_step")
        saved = checkpoint.get("flowvid")
        if saved is None:
            return
        check_codec_identity(self.codec.identity(), saved["codec"], "the checkpoint")
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            self._check_resumed_settings(checkpoint)
        self._merge_adapters_for_a_plain_model(checkpoint)
        self.skipped_steps = int(saved["skipped_steps"])
        self._consecutive_skips = int(saved.get("consecutive_skips", 0))  # checkpoints of earlier versions have none
        self.tokens_seen = int(saved.get("tokens_seen", 0))  # checkpoints of earlier versions have none
        self.videos_seen = int(saved.get("videos_seen", 0))
        self._load_average(saved["ema"])
        self._resumed_schedule_length = saved.get("schedule_length")  # checkpoints of earlier versions have none
        self.skipped_samples.resumed = saved.get("data_skips")

    def _check_resumed_settings(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run continues the checkpoint's: compare the settings it was trained with, and its
        precision, with this run's (``RESUMED_SETTINGS``)."""
        recorded = dict(checkpoint.get("hyper_parameters") or {})
        precision = checkpoint["flowvid"].get("precision")  # none from earlier versions, nor saved outside a Trainer
        if precision is not None:
            recorded["precision"] = precision
        check_resumed_settings(recorded, {**self.hparams, "precision": str(self.trainer.precision)})

    def _load_average(self, average: dict[str, torch.Tensor] | None) -> None:
        if self.ema is not None and average is not None:
            self.ema.load_state_dict(average)
        elif average is not None:
            rank_zero_warn("the checkpoint holds a moving average of the weights, which this model (ema_decay "
                           "null) leaves out: its trained weights are used, and a run continued from here keeps "
                           "no average; keep model.init_args.ema_decay to use it")
        elif self.ema is not None:
            rank_zero_warn(f"the checkpoint holds no moving average of the weights (its run had ema_decay null): "
                           f"this model's average (ema_decay={self.ema.decay}) starts from the resumed weights, at "
                           "the next optimiser step; until then validation and samples use the trained weights")

    def _merge_adapters_for_a_plain_model(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA run's checkpoint loaded into a model without adapters (``load_from_checkpoint``, which knows
        nothing of the ``LoRA`` callback) gives the model it adapted with the adapters merged in, trained
        weights and moving average alike, as ``flowvid export`` does. (A run resumed without the callback
        was refused before this, by ``RunCheckpoint``.)"""
        state = checkpoint.get("state_dict") or {}
        if not any(map(is_adapter_key, state)) or any(isinstance(layer, LoRALinear) for layer in self.modules()):
            return
        saved = checkpoint["flowvid"]
        if saved.get("ema"):
            averaged = merge_lora({**state, **{name: v for name, v in saved["ema"].items() if name in state}})
            adapted = {name.removesuffix("lora_a") + "weight" for name in state if name.endswith("lora_a")}
            saved["ema"] = {name: averaged[name] for name in averaged if name in saved["ema"] or name in adapted}
        checkpoint["state_dict"] = merge_lora(state)

    def on_train_start(self) -> None:
        self.accumulation_start = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._resume_skips_in_a_row()
        # Both lengths are known only now: DeepSpeed restores the checkpoint after building the optimiser,
        # other strategies before. A model built by load_from_checkpoint and fitted afresh resumes nothing.
        if self.trainer.ckpt_path is not None:
            self._warn_if_schedule_changes_length()
            self._apply_configured_rates()
            self.skipped_samples.resume(self.trainer.world_size)

    def _warn_if_schedule_changes_length(self) -> None:
        """The schedule's rate functions are not in the checkpoint: they are rebuilt from this run's
        length, so a resumed run whose length differs (a larger ``max_steps``, other epochs or data)
        does not continue the learning rates of the run it resumes."""
        old, new = self._resumed_schedule_length, self.schedule_length
        if old is None or old == new:
            return
        rank_zero_warn(f"the learning-rate schedule changes length from the checkpoint's {old} optimiser steps to "
                       f"{new} (it spans max_steps unless schedule_steps is set): the resumed run's learning rates "
                       f"are not those the checkpoint's run would have used; --model.init_args.schedule_steps {old} "
                       "keeps the original schedule")

    def _apply_configured_rates(self) -> None:
        """The checkpoint restores the optimiser's peak rates and weight decay, and the rates of the step it
        resumes at; the run's config wins, so that a run resumed with another ``lr``, ``denoiser_lr`` or
        ``weight_decay``, or another length of schedule, trains with them from its first step (its schedule,
        ``min_lr`` included, is already this run's)."""
        scheduler = self.lr_schedulers()
        peaks = {"flow": self.hparams.lr, "denoiser": self.hparams.denoiser_lr}
        changed = set()
        for index, group in enumerate(scheduler.optimizer.param_groups):
            peak, decay = peaks[group["name"]], self.hparams.weight_decay
            if scheduler.base_lrs[index] != peak or group["weight_decay"] != decay:
                changed.add(group["name"])
            scheduler.base_lrs[index] = group["initial_lr"] = peak
            group["weight_decay"] = decay
        if changed or self._resumed_schedule_length not in (None, self.schedule_length):
            rates = [base * factor(scheduler.last_epoch)
                     for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, rate in zip(scheduler.optimizer.param_groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates
        if not changed:
            return
        rank_zero_warn(f"the {' and '.join(sorted(changed))} learning rate or weight decay differs from the checkpoint's: "
                       "the resumed run trains with this run's lr, denoiser_lr and weight_decay")


@contextmanager
def record_block_outputs(flow: GlobalLocalFlow) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect ``(tokens, logdet per element)`` of every block of one forward pass, data-to-noise order."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [block.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
               for block in flow.blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
