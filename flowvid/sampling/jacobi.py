"""Video-aware block-Jacobi inversion: many slots per pass instead of one.

The inverse of a block is the fixed point ``x = mu(shift(x)) + sigma(shift(x)) * z``. Jacobi solves it
for a run ("block") of slots at once: guess the block's values, evaluate all its slots in one parallel
pass from the current guesses, replace the guesses by the results and repeat until the relative change
is below ``tol``. After ``k`` passes the first ``k`` slots of a block are exact, so a block converges in
at most ``block size`` passes, usually in a few. Each pass makes a video's first open slot exact and
the slots after it that read only values the pass barely moved final; once slots are final for every
video, passes start after them. Each pass overwrites the open slots' keys/values in the cache.
Every video of a batch stops on its own: once its change is below ``tol`` it leaves the passes, so a
video's samples do not depend on the videos sampled with it, and an easy video costs no more because
a hard one shares its batch.

Video-aware warm start: a slot's first guess comes from the same position one frame earlier, which is
already close when the video changes slowly. By default it reuses that slot's affine parameters
``(mu, sigma)`` with the slot's own noise, so only the change of ``mu, sigma`` between frames is left to
iterate away (in the first frame it borrows them from one row earlier); ``warm_start="values"`` copies
the earlier frame's values instead, as the reference implementation does.

The deep block uses ``first_block_size`` slots per block inside the first frame (no earlier frame to
warm-start from) and ``block_size`` afterwards; shallow blocks invert every frame of the video at once
(frames are independent there), ``first_block_size`` slots at a time. When streaming, frames reach
the shallow blocks one at a time: after the first, each is guessed from the frame before it, like
the deep block's frames, and solved as one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Iterator

import torch
import torch.distributed as dist

from flowvid.caller_warnings import warn_caller
from flowvid.checks import is_count
from flowvid.registry import SAMPLERS
from flowvid.sampling.base import BlockSampler
from flowvid.sampling.inversion import BlockInversion


@dataclass
class JacobiStats:
    """Passes spent on each block of slots of one flow block."""

    tokens_per_frame: int
    block_sizes: list[int] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    sample_iterations: list[float] = field(default_factory=list)
    slot_evaluations: list[float] = field(default_factory=list)
    block_frames: list[int] = field(default_factory=list)
    unconverged_blocks: int = 0

    def record(self, first: int, size: int, iterations: int, sample_iterations: float, slot_evaluations: float,
               converged: bool) -> None:
        """A block solved in ``iterations`` passes, in which a video took part ``sample_iterations`` times and
        had ``slot_evaluations`` of its slots evaluated, on average."""
        self.block_sizes.append(size)
        self.iterations.append(iterations)
        self.sample_iterations.append(round(sample_iterations, 4))
        self.slot_evaluations.append(round(slot_evaluations, 4))
        self.block_frames.append(first // self.tokens_per_frame)
        self.unconverged_blocks += not converged

    @property
    def passes(self) -> float:
        """Slot evaluations per solved slot and video: the cost in forward passes of this block (1 is the floor)."""
        return sum(self.slot_evaluations) / max(sum(self.block_sizes), 1)

    def iterations_per_frame(self) -> dict[int, int]:
        per_frame: dict[int, int] = {}
        for frame, iterations in zip(self.block_frames, self.iterations):
            per_frame[frame] = per_frame.get(frame, 0) + iterations
        return per_frame

    def to_dict(self) -> dict:
        return {
            "block_sizes": self.block_sizes,
            "block_frames": self.block_frames,
            "iterations": self.iterations,
            "sample_iterations": self.sample_iterations,
            "slot_evaluations": self.slot_evaluations,
            "iterations_per_frame": {str(k): v for k, v in self.iterations_per_frame().items()},
            "passes": round(self.passes, 4),
            "unconverged_blocks": self.unconverged_blocks,
        }


@dataclass
class JacobiRun:
    """One sampling call: statistics of the deep block and each shallow block (by index), and the
    warm starts of frames that come one at a time."""

    deep: JacobiStats | None = None
    shallow: dict[int, JacobiStats] = field(default_factory=dict)
    warned: bool = False  # about blocks still moving at max_iterations, once per call
    # (x, mu, sigma) of the frame each shallow block inverted last, when frames come one at a time.
    last_frames: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "deep": self.deep.to_dict() if self.deep else None,
            "shallow": {str(index): stats.to_dict() for index, stats in sorted(self.shallow.items())},
        }


def any_rank_moving(moving: int, device: torch.device) -> bool:
    """Whether a video on any rank still moves: with a process group, every rank runs as many passes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([moving], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        moving = int(count.item())
    return moving > 0


def pass_change(new: torch.Tensor, old: torch.Tensor, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far one pass moved the open slots of each video's block (``new`` and ``old``: B, n, C), in
    fp32: ``||new - old|| / ||x||`` (B,), where ``x`` is the block (its ``final`` slots, then ``new``), and
    each slot's move relative to the block's root-mean-square slot (B, n)."""
    new, old, final = new.float(), old.float(), final.float()
    norm = (new.square().sum((1, 2)) + final.square().sum((1, 2))).sqrt().clamp_min(1e-12)
    moves = (new - old).norm(dim=2)
    slots = new.shape[1] + final.shape[1]
    return moves.square().sum(1).sqrt() / norm, moves * slots ** 0.5 / norm[:, None]


def leading_run(flags: torch.Tensor) -> torch.Tensor:
    """The number of leading True values of every row of ``flags`` (B, n)."""
    return flags.int().cumprod(dim=1).sum(dim=1)


def check_tolerance(tol: float, name: str = "tol") -> None:
    """A ValueError unless ``tol`` is a number in (0, 1); ``name`` is what the caller called it (``--tol``)."""
    if isinstance(tol, bool) or not isinstance(tol, Real) or not 0 < tol < 1:
        raise ValueError(f"{name} must be a number in (0, 1): a relative change per pass, got {tol!r}")


WARM_STARTS = ("affine", "values", "noise")

#: Slots per first-frame and shallow block on a CPU: small blocks save passes of work where tokens lean
#: on their neighbours (docs/sampling.md, "Small blocks").
CPU_FIRST_BLOCK_SIZE = 16

#: A slot is settled once a pass moved every slot before it by less than this share of ``tol`` (relative
#: to the block's root-mean-square slot): the inputs it was evaluated from were then as good as final.
SETTLED_SHARE = 0.1


@SAMPLERS.register("jacobi")
class JacobiSampler(BlockSampler):
    """Block-Jacobi inversion of a GlobalLocalFlow, with a warm start from the previous frame.

    Args:
        tol: a video's block is done when the relative change of its values in one pass, ``||x_new -
            x_old|| / ||x_new||``, drops below ``tol``; the block is done when every video's is. This
            bounds the last pass's change, not an error: the distance to the exact inverse and the noise
            residual ``||flow(x) - z|| / ||z||`` each came out from a fraction of ``tol`` to several times
            it, depending on the model. Measure both for a model with ``benchmarks/sampling.py
            --checkpoint`` before loosening ``tol``.
        block_size: slots per block after the first frame of the deep block; None means one frame.
        first_block_size: slots per block in the first frame, and in the shallow blocks. None: one
            frame on a GPU, where the count of passes in a row sets the time (one H200 sampled 5x
            faster than with 16), and ``CPU_FIRST_BLOCK_SIZE`` on a CPU, where the work does.
        max_iterations: passes per block at most; a block still moving then is accepted as is,
            counted in ``last_stats`` (``unconverged_blocks``) and named in a warning (once per call).
        warm_start: the first guess of a slot. ``"affine"``: the affine parameters (mu, sigma) found
            one frame earlier at the same position (in the first frame: one row earlier) applied to
            the slot's own noise; ``"values"``: the value one frame earlier at the same position;
            ``"noise"``: the slot's noise (the inverse of a block at its identity initialisation).

    After every call ``last_stats`` holds the passes spent per block (see ``JacobiStats``).
    """

    def __init__(self, tol: float = 1e-2, block_size: int | None = None, first_block_size: int | None = None,
                 max_iterations: int = 32, warm_start: str = "affine"):
        check_tolerance(tol)
        for name, value in (("block_size", block_size), ("first_block_size", first_block_size),
                            ("max_iterations", max_iterations)):
            if value is None and name != "max_iterations":  # a size that depends on the frame
                continue
            if not is_count(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {warm_start!r}")
        self.tol = tol
        self.block_size = block_size
        self.first_block_size = first_block_size
        self.max_iterations = max_iterations
        self.warm_start = warm_start
        self.call = JacobiRun()

    def call_stats(self) -> dict:
        """Passes per block of the last call (deep and shallow blocks), as JSON-ready values."""
        return self.call.to_dict()

    def new_call(self) -> JacobiRun:
        return JacobiRun()

    # --- one block of slots -------------------------------------------------------------------
    def _guess(self, inversion: BlockInversion, size: int) -> None:
        """Write the first guesses of the next ``size`` slots (the buffer starts out as the noise)."""
        if self.warm_start == "noise":
            return
        height, width = inversion.block.spec.frame_size
        per_frame = height * width
        first, end = inversion.done, inversion.done + size
        if self.warm_start == "values":
            # The previous frame at the same positions, frame by frame: a block may span several frames.
            for start in range(max(first, per_frame), end, per_frame):
                stop = min(start + per_frame, end)
                inversion.x[:, start:stop] = inversion.x[:, start - per_frame:stop - per_frame]
            return
        # Slot s borrows (mu, sigma) of slot s - offset: the previous frame if there is one, else the previous row.
        offset = per_frame if first >= per_frame else width
        for start in range(max(first, offset), end, offset):
            stop = min(start + offset, end)
            target, source = slice(start, stop), slice(start - offset, stop - offset)
            inversion.mu[:, target] = inversion.mu[:, source]
            inversion.sigma[:, target] = inversion.sigma[:, source]
            inversion.x[:, target] = inversion.mu[:, target] + inversion.sigma[:, target] * inversion.z[:, target]

    def _solve(self, inversion: BlockInversion, size: int, stats: JacobiStats, guessed: bool = False) -> None:
        """Guess the next ``size`` slots (unless ``guessed`` already), iterate each video's to convergence
        and commit them.

        A pass evaluates every slot from the values before it, so a video's first open slot, which reads
        only final values, comes out exact, and so, nearly, does every slot after it whose inputs the pass
        barely moved (``SETTLED_SHARE``). Those slots are final for that video: later passes leave them
        as they are, and once they are final for every video still moving, the passes start after them.
        """
        if not guessed:
            self._guess(inversion, size)
        first, end = inversion.done, inversion.done + size
        device = inversion.x.device
        batch = inversion.x.shape[0]
        moving = list(range(batch))  # videos still iterating, ascending
        final_up_to = [first] * batch  # per video: its slots before this one are final
        passes = evaluations = 0
        for iteration in range(1, self.max_iterations + 1):
            done = inversion.done
            open_slots = end - done
            if moving:
                samples = None if len(moving) == batch else torch.tensor(moving, device=device)
                rows = slice(None) if samples is None else samples
                old = inversion.x[rows, done:end]
                new = inversion.propose(open_slots, samples)
                ahead = [final_up_to[video] - done for video in moving]
                if any(ahead):  # slots final for their video keep their values
                    is_final = torch.arange(open_slots, device=device) < torch.tensor(ahead, device=device)[:, None]
                    new = torch.where(is_final[..., None], old, new)
                change, moves = pass_change(new, old, inversion.x[rows, first:done])
                inversion.x[rows, done:end] = new
                passes += len(moving)
                evaluations += len(moving) * open_slots
                barely_moved = leading_run(moves[:, :-1] < SETTLED_SHARE * self.tol).tolist()
                still_moving = (change >= self.tol).tolist()
                for video, run in zip(moving, barely_moved):
                    final_up_to[video] = done + run + 1
                moving = [video for video, go in zip(moving, still_moving) if go and final_up_to[video] < end]
            else:  # only under a process group: this rank's videos are done, another rank's are not
                inversion.rehearse(open_slots)
            converged = not any_rank_moving(len(moving), device)
            if converged:
                break
            if moving:
                inversion.commit(min(final_up_to[video] for video in moving) - done)
        inversion.commit(end - inversion.done)
        stats.record(first, size, iteration, passes / batch, evaluations / batch, converged)
        if not converged:
            self._warn_unconverged(device.type)

    def _warn_unconverged(self, device_type: str) -> None:
        if self.call.warned:
            return
        self.call.warned = True
        bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        advice = ("under bf16 autocast the network's rounding keeps a block's change near 1e-3 to 3e-3: use tol "
                  ">= 1e-2" if bf16 else "raise max_iterations or tol")
        warn_caller(f"JacobiSampler(tol={self.tol}): a block still moved after max_iterations={self.max_iterations} "
                    f"passes and was accepted as it was (last_stats counts unconverged_blocks); {advice}")

    def first_block_size_on(self, device: torch.device, tokens_per_frame: int) -> int:
        """Slots per block in the first frame and in the shallow blocks when sampling on ``device``."""
        if self.first_block_size is not None:
            return self.first_block_size
        return CPU_FIRST_BLOCK_SIZE if device.type == "cpu" else tokens_per_frame

    def _next_size(self, inversion: BlockInversion, tokens_per_frame: int) -> int:
        if inversion.done < tokens_per_frame:
            first_block_size = self.first_block_size_on(inversion.x.device, tokens_per_frame)
            return min(first_block_size, tokens_per_frame - inversion.done)
        size = self.block_size or tokens_per_frame
        return min(size, inversion.num_slots - inversion.done)

    # --- the BlockSampler hooks ------------------------------------------------------------------
    def deep_frames(self, inversion: BlockInversion, tokens_per_frame: int) -> Iterator[torch.Tensor]:
        stats = self.call.deep = JacobiStats(tokens_per_frame)
        yielded = inversion.done // tokens_per_frame
        while inversion.done < inversion.num_slots:
            self._solve(inversion, self._next_size(inversion, tokens_per_frame), stats)
            while (yielded + 1) * tokens_per_frame <= inversion.done:
                yield inversion.frame(yielded, tokens_per_frame)
                yielded += 1

    def invert_frames(self, block, frames, index):
        inversion = BlockInversion(block, frames)
        per_frame = frames.shape[1]
        stats = self.call.shallow.setdefault(index, JacobiStats(per_frame))
        guessed = self._guess_from_last_frame(inversion, index)
        while inversion.done < inversion.num_slots:
            # A frame guessed from the one before it is one block: fewer, wider passes.
            size = inversion.num_slots if guessed else self._next_size(inversion, per_frame)
            self._solve(inversion, size, stats, guessed)
        self.call.last_frames[index] = (inversion.x, inversion.mu, inversion.sigma)
        return inversion.result()

    def _guess_from_last_frame(self, inversion: BlockInversion, index: int) -> bool:
        """Streaming inverts a shallow block one frame at a time: guess every slot from the frame before,
        at the same position, as the deep block does. False when there is no such frame."""
        last = self.call.last_frames.get(index)
        if last is None or last[0].shape != inversion.x.shape or self.warm_start == "noise":
            return False
        x, mu, sigma = last
        if self.warm_start == "values":
            inversion.x.copy_(x)
        else:
            inversion.mu.copy_(mu)
            inversion.sigma.copy_(sigma)
            inversion.x.copy_(mu + sigma * inversion.z)
        return True
