"""Mistyped recipe values are refused when the model and callbacks are built, with the argument named."""

import re

import numpy as np
import pytest

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows import GlobalLocalFlow
from flowvid.flows.autoregressive import AffineBlock
from flowvid.flows.base import BlockSpec
from flowvid.lit import FlowModule
from flowvid.lit.callbacks import FVDCallback, SampleVideoLogger

NAN, INF = float("nan"), float("inf")


def build_module(**overrides) -> FlowModule:
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3))
    return FlowModule(flow, PixelCodec(patch_size=2), **{"video_shape": (3, 4, 6), **overrides})


@pytest.mark.parametrize("change, message", [
    # An infinite rate or noise level passes "> 0" and turns every step's numbers into NaN: skipped steps.
    (dict(lr=INF), "lr must be > 0 and finite, got inf"),
    (dict(denoiser_lr=INF), "denoiser_lr must be > 0 and finite, got inf"),
    (dict(noise_std=INF), "noise_std must be > 0 and finite, got inf"),
    # 3.5 frames were truncated to 3.
    (dict(video_shape=(3.5, 4, 6)), "video_shape is (frames, height, width), each >= 1, got [3.5, 4, 6]"),
    # True was read as 1.
    (dict(warmup_steps=True), "warmup_steps must be an integer >= 0, got True"),
    (dict(accumulate_grad_batches=True), "accumulate_grad_batches must be an integer >= 1, got True"),
    (dict(schedule_steps=True), "schedule_steps must be an integer >= 1, or null for the run's planned steps, "
                                "got True"),
    # The message names the setting the recipe has, not the class that checks it.
    (dict(ema_decay=1.0), "ema_decay must be in (0, 1), or null for no moving average, got 1.0"),
])
def test_flow_module_refuses_values_that_would_break_training(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_module(**change)


def test_flow_module_takes_a_video_shape_of_numpy_integers_and_no_warmup():
    module = build_module(video_shape=tuple(np.array([3, 4, 6])), warmup_steps=0)
    assert module.video_shape == (3, 4, 6) and all(type(size) is int for size in module.video_shape)


@pytest.mark.parametrize("name, value", [
    ("mlp_ratio", 0.0), ("mlp_ratio", -1.0), ("mlp_ratio", NAN), ("mlp_ratio", True),
    # NaN rotation angles: a NaN likelihood at every step.
    ("rope_theta", 0.0), ("rope_theta", -1.0), ("rope_theta", NAN), ("rope_theta", INF),
])
def test_affine_block_refuses_sizes_that_build_no_working_block(name, value):
    spec = BlockSpec(channels=4, frame_size=(2, 2), width=32, depth=1, head_dim=16)
    with pytest.raises(ValueError, match=re.escape(f"AffineBlock {name} must be > 0 and finite, got {value!r}")):
        AffineBlock(spec, **{name: value})


@pytest.mark.parametrize("value", [2.5, NAN, INF, True])
@pytest.mark.parametrize("callback", [SampleVideoLogger, FVDCallback])
def test_callbacks_refuse_a_step_interval_that_is_not_a_whole_number(callback, value):
    """2.5 ran at multiples of 2.5 steps (every 5th), NaN and inf never ran, True ran every step."""
    with pytest.raises(ValueError, match=re.escape(f"{callback.__name__} every_n_steps must be >= 1, a whole number of "
                                                   f"optimizer steps, got {value!r}")):
        callback(every_n_steps=value)


@pytest.mark.parametrize("callback", [SampleVideoLogger, FVDCallback])
def test_callbacks_refuse_one_caption_string_and_a_float_seed(callback):
    """A string was split into one prompt per letter; a float seed failed at the first sampling."""
    with pytest.raises(ValueError, match=f"{callback.__name__} captions must be a list of strings, got 'a red circle'"):
        callback(captions="a red circle")
    with pytest.raises(ValueError, match=re.escape(f"{callback.__name__} seed must be an integer, got 2.5")):
        callback(seed=2.5)


@pytest.mark.parametrize("fps", [0.0, -8.0, NAN, INF])
def test_sample_video_logger_refuses_a_frame_rate_the_gif_cannot_have(fps):
    with pytest.raises(ValueError, match=re.escape(f"SampleVideoLogger fps must be > 0 and finite, got {fps!r}")):
        SampleVideoLogger(fps=fps)


@pytest.mark.parametrize("num_samples, batch_size", [(2.5, 8), (NAN, 8), (INF, 8), (256, 2.5), (256, True)])
def test_fvd_callback_refuses_counts_that_are_not_whole_numbers(num_samples, batch_size):
    """Floats failed at the first evaluation, thousands of steps into the run; True sampled one video at a time."""
    message = (f"FVDCallback needs whole numbers num_samples >= 2 and batch_size >= 1, "
               f"got {num_samples!r} and {batch_size!r}")
    with pytest.raises(ValueError, match=re.escape(message)):
        FVDCallback(num_samples=num_samples, batch_size=batch_size)


def test_callbacks_keep_the_values_that_mean_something():
    logger = SampleVideoLogger(every_n_steps=np.int64(5), captions=(), seed=-1, fps=0.5)
    assert logger.captions == [""] and logger.every_n_steps == 5  # no prompt: one unconditional sample
    fvd = FVDCallback(every_n_steps=1, num_samples=2, batch_size=1, captions=["a", ""])
    assert fvd.captions == ["a", ""]
