"""The reference implementation (apple/ml-starflow) configured like a flowvid flow, for side-by-side timing.

    python benchmarks/reference.py --reference PATH     # a quick check that both models build alike

The reference is never part of flowvid: ``PATH`` is a checkout of it (the folder holding
``transformer_flow.py`` and ``misc/``), given on the command line. Both implementations are built from
one ``SharedConfig`` so that they do the same arithmetic: the same shallow/deep split, widths, depths,
head size, MLP ratio, text length and width, the same frame-local shallow blocks with alternating
directions and the same SOS token, soft clip, softplus scale and final RMSNorm. Parameter counts agree
to within a few hundred (the reference keeps a few deprecated buffers, which are not parameters).

The reference's Jacobi calls ``torch.distributed.all_reduce`` unconditionally, so
``single_process_group`` starts a one-process gloo group first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn

from flowvid.flows import GlobalLocalFlow
from flowvid.text.base import TextEmbedding


@dataclass(frozen=True)
class SharedConfig:
    """One flow configuration that both implementations can build.

    ``shallow_blocks`` frame-local blocks of ``shallow_depth`` layers, then a text-conditioned deep block
    of ``deep_depth`` layers, all of width ``width``; videos of ``frames`` x ``frame_size`` x
    ``channels`` latents; ``text_length`` text tokens of width ``text_width``.
    """

    width: int = 128
    deep_depth: int = 4
    shallow_blocks: int = 3
    shallow_depth: int = 2
    head_dim: int = 64
    channels: int = 8
    frame_size: tuple[int, int] = (8, 8)
    frames: int = 4
    text_length: int = 16
    text_width: int = 64
    batch: int = 8

    @property
    def tokens(self) -> int:
        """Video tokens per sample (text tokens not counted)."""
        return self.frames * self.frame_size[0] * self.frame_size[1]

    def label(self) -> str:
        h, w = self.frame_size
        return (f"width {self.width}, {self.shallow_blocks}x{self.shallow_depth} shallow + {self.deep_depth} deep layers, "
                f"batch {self.batch} x {self.frames}x{h}x{w}x{self.channels} + {self.text_length} text tokens")

    def build_flow(self) -> GlobalLocalFlow:
        return GlobalLocalFlow(
            latent_channels=self.channels, frame_size=self.frame_size, num_shallow=self.shallow_blocks,
            shallow_width=self.width, shallow_depth=self.shallow_depth, deep_width=self.width,
            deep_depth=self.deep_depth, head_dim=self.head_dim, text_width=self.text_width,
        )

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, TextEmbedding]:
        """Latents (B, T, h, w, c) and fully valid text states (B, L, D), the same for both models."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.frames, *self.frame_size, self.channels, generator=generator)
        tokens = torch.randn(self.batch, self.text_length, self.text_width, generator=generator)
        return x, TextEmbedding(tokens, torch.ones(self.batch, self.text_length, dtype=torch.bool))


def load_reference(path: str | os.PathLike) -> ModuleType:
    """Import ``transformer_flow`` from a checkout of the reference implementation."""
    folder = Path(path).resolve()
    if not (folder / "transformer_flow.py").is_file() or not (folder / "misc").is_dir():
        raise FileNotFoundError(f"{folder} is not a checkout of the reference implementation: expected "
                                "transformer_flow.py and misc/ in it")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("transformer_flow")


def build_reference(module: ModuleType, config: SharedConfig) -> nn.Module:
    """The reference's STARFlow-V model with the configuration's sizes.

    With ``seq_order='L2R'`` its bottom blocks alternate flip / identity starting from a flip and its
    top block uses the identity when the block count is even, which is flowvid's order for an odd
    number of shallow blocks; the rotary tables differ in frequencies only, not in cost.
    """
    h, w = config.frame_size
    if h != w:
        raise ValueError(f"the reference takes square frames, got {config.frame_size}")
    return module.Model(
        in_channels=config.channels, img_size=h, patch_size=1, channels=config.width,
        num_blocks=config.shallow_blocks + 1,
        layers_per_block=[config.shallow_depth] * config.shallow_blocks + [config.deep_depth],
        head_dim=config.head_dim, rope=True, sos=True, txt_size=config.text_length, txt_dim=config.text_width,
        cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R",
        temporal_causal=1, shallow_block_local=True,
    )


def reference_video(x: torch.Tensor) -> torch.Tensor:
    """flowvid latents (B, T, h, w, c) in the reference's video layout (B, T, c, h, w)."""
    return x.permute(0, 1, 4, 2, 3).contiguous()


def reference_loss(model: nn.Module, x: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
    """The reference's maximum-likelihood loss of one batch (the quantity its training step minimises)."""
    z, _, _, logdets = model(x, text.tokens)
    return model.get_loss(z, logdets)["loss"]


def single_process_group() -> None:
    """A one-process gloo group: the reference's Jacobi all-reduces its stopping test unconditionally."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)


@torch.no_grad()
def reference_jacobi(model: nn.Module, z: torch.Tensor, text: TextEmbedding, block_size: int,
                     threshold: float, max_iterations: int = 32) -> torch.Tensor:
    """The reference's Jacobi sampling of noise ``z`` in its own layout (B, T, c, h, w).

    ``threshold`` bounds its stopping test, ``mean((new - old)^2) / mean(new^2)``: the square of
    flowvid's relative change.
    """
    single_process_group()
    return model.reverse(z, text.tokens, guidance=0.0, jacobi=True, jacobi_block_size=block_size,
                         jacobi_th=threshold, jacobi_max_iter=max_iterations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="checkout of apple/ml-starflow")
    args = parser.parse_args(argv)
    config = SharedConfig()
    module = load_reference(args.reference)
    ours, theirs = config.build_flow(), build_reference(module, config)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    print(config.label())
    print(f"parameters: flowvid {count(ours):,}, reference {count(theirs):,}")
    x, text = config.inputs()
    print(f"reference loss at initialisation: {reference_loss(theirs, reference_video(x), text).item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
