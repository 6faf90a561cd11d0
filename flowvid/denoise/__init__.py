"""The causal denoiser and flow-score matching (its training target and the Tweedie fallback)."""

from flowvid.denoise.network import CausalDenoiser, denoiser_attention_mask
from flowvid.denoise.score import flow_score_target, score_matching_tap, tweedie_denoise

__all__ = ["CausalDenoiser", "denoiser_attention_mask", "flow_score_target", "score_matching_tap", "tweedie_denoise"]
