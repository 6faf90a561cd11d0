"""Training speed in the logs: videos and latent tokens per second, model FLOP/s and MFU.

``TrainingThroughput`` logs, at the trainer's ``log_every_n_steps``, rates averaged over the last
``window`` steps. A step here is a window of ``accumulate_grad_batches`` batches: an optimiser step, or
one the module skipped (its batches ran forward and backward and count in ``tokens_seen``). The first
step of a run, or of a resumed run, is left out (it compiles, starts the data workers and warms up the
kernels), so the first rates come after the second step:

* ``throughput/videos_per_sec`` and ``throughput/tokens_per_sec`` (latent tokens) of the whole run,
  all processes together, and ``throughput/tokens_per_sec_per_device``;
* ``throughput/step_seconds``: wall time of one step (data loading, the forward and backward passes, the
  optimiser and whatever other callbacks do in the step, checkpoints included; validation and the
  evaluations run in ``apart_from_training``, the samples and FVD of ``flowvid.lit.callbacks``, are
  left out);
* ``throughput/model_tflops_per_device`` and ``throughput/mfu``: model FLOPs per second, counted as
  ``6 x parameters x latent tokens`` over the flow and the denoiser (2 in the forward and 4 in the
  backward pass per parameter and token; a frozen weight's own gradient, 2 of the 4, is not computed
  and not counted; attention and text tokens are not counted, the usual LLM convention), and their
  share of the device's peak;
* ``train/tokens_seen`` and ``train/videos_seen``: totals of the run, carried over by a resume;
* ``memory/peak_gb``: the most memory training has held so far on the first process's device: on a
  GPU the tensors' peak (``torch.cuda.max_memory_allocated``, with ``memory/peak_reserved_gb``, what
  the caching allocator holds, the figure that runs out first), on a CPU the process's peak resident
  size (the Python process, its data and the model).

The peak of a GPU is its datasheet figure for the run's precision (Lightning's table, as litgpt
reports MFU); a CPU has none, so there the peak is the FLOP/s of a large square matmul in the run's
precision (2048 x 2048, or smaller where one such product would take long: bf16 on a CPU without
native bf16), the fastest of those measured when training starts and every ``REMEASURE_STEPS`` steps
after: on a CPU MFU says how close the step comes to what the machine's matmul kernels give
(``docs/benchmarks.md`` uses the same denominator).

It works with any LightningModule that offers ``tokens_seen`` and ``videos_seen`` (totals over
all processes) and ``model_flops_per_token``, and counts skipped steps in ``skipped_steps`` if it skips
any (``FlowModule`` does).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from flowvid.lit.step_axis import log_training_point

#: Largest side of the square matmul whose FLOP/s stand in for a device's peak when no datasheet figure
#: is known.
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}

#: The measuring matmul's side doubles from 256 towards ``MATMUL_SIDE`` while one product takes less
#: than this: long enough for the kernels to reach their peak, short enough that a CPU which emulates
#: bf16 (about a hundred times slower than fp32) is not held up for minutes at every measurement.
MATMUL_SECONDS = 0.1

#: A measured peak is measured again every this many steps and the highest kept: a machine busy with
#: something else when training starts would otherwise set it too low (and MFU too high).
REMEASURE_STEPS = 100


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the network's matmuls under a Lightning precision setting."""
    return torch.bfloat16 if str(precision).startswith("bf16") else torch.float32


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> float:
    """FLOP/s of the fastest of ``rounds`` square matmuls in ``dtype`` on ``device``, of the first side
    from 256 up to ``MATMUL_SIDE`` whose product takes ``MATMUL_SECONDS``."""
    largest = MATMUL_SIDE.get(device.type, 2048)
    side = min(256, largest)
    while side < largest and matmul_seconds(device, dtype, side, repeats=1) < MATMUL_SECONDS:
        side *= 2
    return 2.0 * side**3 / matmul_seconds(device, dtype, side, repeats=rounds)


def matmul_seconds(device: torch.device, dtype: torch.dtype, side: int, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` products of two ``side`` x ``side`` matrices."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """``memory/peak_gb`` (and on a GPU ``memory/peak_reserved_gb``) of this process on ``device``."""
    if device.type == "cuda":
        return {"memory/peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "memory/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory/peak_gb": peak * (1 if sys.platform == "darwin" else 1024) / 1e9}  # bytes on macOS, KiB elsewhere


#: Dense bf16 tensor-core peaks of Hopper cards, by words of their device name, most specific first.
#: Lightning's table gives the H100 NVL and H200 figures with sparsity (twice the dense ones) and does not
#: match an H200 by the name the driver reports ("NVIDIA H200"). Source: NVIDIA's H100 and H200 datasheets.
HOPPER_BF16_DENSE = ((("h200", "nvl"), 835.5e12), (("h200",), 989.4e12), (("h100", "nvl"), 835.5e12))


def datasheet_flops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak of a GPU that flowvid or Lightning knows, for ``precision``; None for others."""
    if device.type != "cuda":
        return None
    dtype = compute_dtype(precision)
    if dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device).lower()
        for words, peak in HOPPER_BF16_DENSE:
            if all(word in name for word in words):
                return peak
    known = get_available_flops(device, dtype)
    return float(known) if known else None


class TrainingThroughput(Callback):
    """Logs videos/s, latent tokens/s, model FLOP/s and MFU of training (see the module's docstring).

    Args:
        window: steps the rates are averaged over (the first log comes after two steps).
        peak_flops: FLOP/s of one device that MFU is measured against: ``"auto"`` (the datasheet peak of
            a known GPU, else a measured matmul's), a number, or None for no MFU.
    """

    def __init__(self, window: int = 20, peak_flops: float | Literal["auto"] | None = "auto"):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a whole number of steps >= 1, got {window!r}")
        if peak_flops is not None and peak_flops != "auto" and not (
                isinstance(peak_flops, (int, float)) and math.isfinite(peak_flops) and peak_flops > 0):
            raise ValueError(f"peak_flops must be 'auto', a positive number of FLOP/s or None, got {peak_flops!r}")
        self.window = window
        self.peak_flops = peak_flops
        self.device_peak: float | None = None
        self._measured: tuple[torch.device, torch.dtype] | None = None  # what a measured peak is measured on
        # (time, tokens, videos) at the end of each of the last `window` steps and of the one before them.
        self._marks: deque[tuple[float, int, int]] = deque(maxlen=window + 1)
        self._last_step = -1
        self._validation_start: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        missing = [name for name in ("tokens_seen", "videos_seen", "model_flops_per_token")
                   if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(f"TrainingThroughput needs a LightningModule with {', '.join(missing)} "
                            f"(as flowvid.lit.FlowModule has); {type(pl_module).__name__} has not")
        if self.peak_flops != "auto":
            self.device_peak = self.peak_flops
            return
        device, precision = trainer.strategy.root_device, str(trainer.precision)
        self.device_peak = datasheet_flops(device, precision)
        if self.device_peak is None and device.type in MATMUL_SIDE:
            self._measured = (device, compute_dtype(precision))
            self.device_peak = measured_matmul_flops(*self._measured)
        if self.device_peak is None:
            rank_zero_warn(f"TrainingThroughput: no peak FLOP/s known for {device}; MFU is not logged (set peak_flops)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._marks.clear()
        # 0, or the steps a resumed run starts after: not a step just ended. No mark yet: the first step
        # (compilation, the data workers starting) is left out of the rates, which start at its end.
        self._last_step = steps_ended(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = steps_ended(trainer, pl_module)
        if step == self._last_step:  # inside an accumulation window
            return
        self._last_step = step
        self._mark(pl_module)
        if self._measured is not None and step % REMEASURE_STEPS == 0:
            started = time.perf_counter()
            self.device_peak = max(self.device_peak, measured_matmul_flops(*self._measured))
            self.leave_out(time.perf_counter() - started)
        metrics = {"train/tokens_seen": float(pl_module.tokens_seen),
                   "train/videos_seen": float(pl_module.videos_seen), **peak_memory_gb(trainer.strategy.root_device)}
        if len(self._marks) >= 2:
            metrics.update(self._rates(trainer.world_size, pl_module.model_flops_per_token))
        # For callbacks (trainer.callback_metrics); the loggers get them beside the losses of the step that
        # just ended (a skipped one's beside the step before it).
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True, logger=False)
        log_training_point(trainer, metrics, max(trainer.global_step - 1, 0))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_start is None:
            return
        self.leave_out(time.perf_counter() - self._validation_start)
        self._validation_start = None

    def leave_out(self, seconds: float) -> None:
        """Time that was not training (validation, sampling, measuring the peak): the steps before it seem
        to have ended later by its length, so no window spans it."""
        self._marks = deque(((t + seconds, tokens, videos) for t, tokens, videos in self._marks),
                            maxlen=self._marks.maxlen)

    def _mark(self, pl_module: LightningModule) -> None:
        self._marks.append((time.perf_counter(), int(pl_module.tokens_seen), int(pl_module.videos_seen)))

    def _rates(self, world_size: int, flops_per_token: float) -> dict[str, float]:
        (t0, tokens0, videos0), (t1, tokens1, videos1) = self._marks[0], self._marks[-1]
        seconds = max(t1 - t0, 1e-9)
        tokens_per_sec = (tokens1 - tokens0) / seconds
        per_device_flops = flops_per_token * tokens_per_sec / world_size
        rates = {
            "throughput/videos_per_sec": (videos1 - videos0) / seconds,
            "throughput/tokens_per_sec": tokens_per_sec,
            "throughput/tokens_per_sec_per_device": tokens_per_sec / world_size,
            "throughput/step_seconds": seconds / (len(self._marks) - 1),
            "throughput/model_tflops_per_device": per_device_flops / 1e12,
        }
        if self.device_peak:
            rates["throughput/mfu"] = per_device_flops / self.device_peak
        return rates


def steps_ended(trainer: Trainer, pl_module: LightningModule) -> int:
    """Steps the run has ended: the optimiser's, and those the module skipped (a skipped step does not
    move ``global_step``, but its batches took their time and count in ``tokens_seen``)."""
    return trainer.global_step + getattr(pl_module, "skipped_steps", 0)


@contextmanager
def apart_from_training(trainer: Trainer) -> Iterator[None]:
    """Leaves the time spent inside out of the step time and rates of the trainer's ``TrainingThroughput``:
    for evaluations that callbacks run between steps (sampling, FVD), as validation is left out."""
    started = time.perf_counter()
    try:
        yield
    finally:
        for callback in trainer.callbacks:
            if isinstance(callback, TrainingThroughput):
                callback.leave_out(time.perf_counter() - started)
