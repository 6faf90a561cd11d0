"""Lightning training: FlowModule (flow + causal denoiser), its EMA and learning-rate schedule."""

from flowvid.lit.ema import EMA
from flowvid.lit.module import FlowModule
from flowvid.lit.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = ["EMA", "FlowModule", "warmup_cosine", "warmup_cosine_scheduler"]
