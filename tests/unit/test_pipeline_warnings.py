"""Warnings of `VideoPipeline` and of the parts it calls name the caller's line, and a request it refuses is
refused before any warning."""

import warnings

import numpy as np
import pytest

from flowvid.media import write_video
from flowvid.pipeline import GenerateError, VideoPipeline
from flowvid.sampling import SequentialSampler
from test_product_generate_score import checkpoint  # noqa: F401 (fixture)

CLIP = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)  # the training length


@pytest.fixture(scope="module")
def pipe(checkpoint):  # noqa: F811 (a model trained with v2v_prob 0)
    return VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=SequentialSampler())


@pytest.fixture
def file_without_rate(pipe, tmp_path, monkeypatch):
    """A video file that records no frame rate, for a model trained at 12 fps: reading it warns."""
    write_video(tmp_path / "clip.mkv", list(CLIP), fps=12, codec="ffv1")
    monkeypatch.setattr("flowvid.media.stream_rate", lambda stream: None)
    monkeypatch.setattr(pipe.model, "training_fps", 12.0, raising=False)
    return tmp_path / "clip.mkv"


@pytest.mark.parametrize("sample", ["call", "stream"])
def test_a_task_the_model_never_trained_is_warned_of_at_the_callers_line(pipe, sample):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sample == "call":
            pipe("a red circle", task="v2v", video=CLIP, frames=6)
        else:
            next(pipe.stream("a red circle", task="v2v", video=CLIP, frames=6))
    assert [str(w.message)[:40] for w in caught] == ["this model was trained with v2v_prob 0: "]
    assert caught[0].filename == __file__


def test_a_file_without_a_frame_rate_is_warned_of_at_the_callers_line(pipe, file_without_rate):
    for sample in (lambda: pipe.score(file_without_rate, caption="a red circle"),
                   lambda: pipe("a red circle", task="extend", video=file_without_rate, frames=6),
                   lambda: next(pipe.stream("a red circle", task="extend", video=file_without_rate, frames=6))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample()
        no_rate = [w for w in caught if "records no frame rate" in str(w.message)]
        assert len(no_rate) == 1 and no_rate[0].filename == __file__


def test_a_v2v_request_with_nothing_to_sample_is_refused_before_any_warning(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GenerateError, match=r"v2v: 4 frames leave nothing to sample after the video's 4 frames"):
            pipe("a red circle", task="v2v", video=CLIP, frames=4)  # the clip's own length
        with pytest.raises(GenerateError, match="leave nothing to sample"):
            next(pipe.stream("a red circle", task="v2v", video=CLIP, frames=4))
    assert [str(w.message) for w in caught] == []


def test_warnings_of_the_sampler_and_the_text_encoder_name_the_callers_line(pipe):
    from flowvid.sampling import JacobiSampler

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.model.text_encoder.encode(["a red circle " * 20])  # truncated
        VideoPipeline(pipe.model, sampler=JacobiSampler(tol=1e-12, max_iterations=1))("a red circle", frames=4)
    said = {str(w.message).split(":")[0]: w.filename for w in caught}
    assert said["LearnedTextEncoder"] == said["JacobiSampler(tol=1e-12)"] == __file__
