"""FrechetVideoDistance (on the weight-free pixel-stats extractor), reference statistics and BitsPerDim."""

import numpy as np
import pytest
import torch

from flowvid.metrics import BitsPerDim, FrechetVideoDistance, PixelStatsExtractor, ReferenceStats, build_extractor
from flowvid.registry import FVD_EXTRACTORS


def _videos(count: int = 12, frames: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (count, frames, size, size, 3), dtype=torch.uint8, generator=generator)


def _brighter(videos: torch.Tensor, amount: int) -> torch.Tensor:
    return (videos.int() + amount).clamp(0, 255).to(torch.uint8)


def test_extractors_are_registered():
    assert {"i3d", "inception-proxy", "pixel-stats"} <= set(FVD_EXTRACTORS.names())
    assert isinstance(build_extractor("pixel-stats"), PixelStatsExtractor)
    with pytest.raises(ValueError, match="already built"):
        build_extractor(PixelStatsExtractor(), weights="x")


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    real = _videos()
    metric = FrechetVideoDistance("pixel-stats")
    metric.update(real, real=True)
    distances = []
    for shift in (0, 8, 16, 32, 64):
        metric.reset()  # keeps the real statistics
        metric.update(_brighter(real, shift), real=False)
        distances.append(float(metric.compute()))
    assert distances[0] < 1e-9
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_protocol_name_spells_out_extractor_frames_resolution_and_samples():
    metric = FrechetVideoDistance(PixelStatsExtractor())
    metric.update(_videos(6, frames=3, size=8), real=True)
    metric.update(_videos(5, frames=3, size=8, seed=1), real=False)
    metric.compute()
    assert metric.protocol_name == "fvd_debug/pixel-stats_f3_r8_n5"


def test_reset_keeps_real_features_unless_asked():
    kept = FrechetVideoDistance("pixel-stats")
    kept.update(_videos(), real=True)
    kept.reset()
    assert int(kept.real_features_num_samples) == 12
    cleared = FrechetVideoDistance("pixel-stats", reset_real_features=True)
    cleared.update(_videos(), real=True)
    cleared.reset()
    assert int(cleared.real_features_num_samples) == 0


def test_clear_errors_for_bad_videos_and_too_few_samples():
    metric = FrechetVideoDistance("pixel-stats")
    with pytest.raises(ValueError, match=r"expected uint8 videos \(B, T, H, W, 3\), got torch.float32"):
        metric.update(_videos().float(), real=True)
    metric.update(_videos(frames=4), real=True)
    with pytest.raises(ValueError, match=r"one size .* \(5, 16, 16\), earlier ones are \(4, 16, 16\)"):
        metric.update(_videos(frames=5), real=False)
    metric.update(_videos(1, seed=2), real=False)
    with pytest.raises(ValueError, match="at least 2 generated videos, got 1"):
        metric.compute()


def test_cached_reference_gives_the_same_fvd_as_real_videos(tmp_path):
    real, fake = _videos(), _brighter(_videos(seed=3), 10)
    direct = FrechetVideoDistance("pixel-stats")
    direct.update(real, real=True)
    direct.update(fake, real=False)

    stats = direct.real_statistics(source="unit test")
    path = stats.save(tmp_path / stats.file_name())
    assert path.name == "pixel-stats_noweights_f4_r16x16_n12.npz"
    loaded = ReferenceStats.load(path)
    assert loaded.key() == stats.key() and loaded.source == "unit test"

    cached = FrechetVideoDistance("pixel-stats")
    cached.set_reference(path)
    cached.update(fake, real=False)
    assert float(cached.compute()) == pytest.approx(float(direct.compute()), rel=1e-10)
    with pytest.raises(ValueError, match="uses reference statistics"):
        cached.update(real, real=True)
    with pytest.raises(ValueError, match=r"those of the reference statistics are \(4, 16, 16\)"):
        cached.update(_videos(frames=2), real=False)


def test_reference_of_another_extractor_or_size_is_refused(tmp_path):
    stats = ReferenceStats(mu=np.zeros(96), sigma=np.eye(96), extractor="i3d", weights_hash="abc",
                           frames=4, height=16, width=16, num_samples=10)
    metric = FrechetVideoDistance("pixel-stats")
    with pytest.raises(ValueError, match="extractor 'i3d', this metric's extractor has 'pixel-stats'"):
        metric.set_reference(stats)
    metric.update(_videos(frames=8), real=False)
    same_extractor = ReferenceStats(**{**stats.__dict__, "extractor": "pixel-stats", "weights_hash": ""})
    with pytest.raises(ValueError, match=r"reference statistics are \(4, 16, 16\)"):
        metric.set_reference(same_extractor)
    with pytest.raises(FileNotFoundError, match="flowvid data fvd-stats"):
        ReferenceStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not an FVD reference file"):
        ReferenceStats.load(tmp_path / "other.npz")


def test_bits_per_dim_per_video_and_per_frame():
    per_frame = torch.tensor([[1.0, 3.0], [2.0, 4.0], [0.0, 2.0]])
    metric = BitsPerDim(num_frames=2)
    metric.update(per_frame[:2])
    metric.update(per_frame[2:])
    assert float(metric.compute()) == pytest.approx(2.0)
    torch.testing.assert_close(metric.compute_per_frame(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert metric.scalars("val/bpd") == pytest.approx({"val/bpd": 2.0, "val/bpd/frame_00": 1.0, "val/bpd/frame_01": 3.0})

    videos = BitsPerDim()
    videos.update(torch.tensor([1.0, 2.0]))
    videos.update(torch.tensor([6.0]))
    assert float(videos.compute()) == pytest.approx(3.0)  # mean over samples, not over batches
    with pytest.raises(ValueError, match=r"need BitsPerDim\(num_frames=2\)"):
        videos.update(per_frame)
    with pytest.raises(ValueError, match="NaN or inf"):
        videos.update(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"give per-frame values \(B, 2\)"):
        metric.update(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        metric.update(torch.tensor([[float("nan"), 5.0]]))
    # A refused update leaves every sum as it was.
    torch.testing.assert_close(metric.compute_per_frame(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert float(metric.compute()) == pytest.approx(2.0)


def _pixel_stats_reference(frames: int = 4, size: int = 16) -> ReferenceStats:
    return ReferenceStats(mu=np.zeros(96), sigma=np.eye(96), extractor="pixel-stats", weights_hash="",
                          frames=frames, height=size, width=size, num_samples=10)


def test_forward_is_update_and_counts_the_real_statistics_once():
    real, fake = _videos(), _brighter(_videos(seed=3), 10)
    by_update, by_forward = FrechetVideoDistance("pixel-stats"), FrechetVideoDistance("pixel-stats")
    by_update.update(real, real=True)
    for half in fake.split(6):
        by_update.update(half, real=False)
    # torchmetrics' forward resets, updates and adds the saved states back: the kept real sums were doubled.
    assert by_forward(real, real=True) is None
    for half in fake.split(6):
        by_forward(half, real=False)
    assert int(by_forward.real_features_num_samples) == int(by_forward.fake_features_num_samples) == 12
    assert float(by_forward.compute()) == float(by_update.compute())


def test_resetting_the_real_features_keeps_the_size_the_reference_fixes():
    metric = FrechetVideoDistance("pixel-stats", reset_real_features=True)
    metric.set_reference(_pixel_stats_reference(frames=4))
    metric.reset()
    with pytest.raises(ValueError, match=r"these videos are \(2, 16, 16\), those of the reference statistics are "
                                         r"\(4, 16, 16\)"):
        metric.update(_videos(frames=2), real=False)


def test_a_reference_set_after_real_videos_is_refused_instead_of_dropping_them():
    metric = FrechetVideoDistance("pixel-stats")
    metric.update(_videos(), real=True)
    with pytest.raises(ValueError, match="already holds 12 real videos; a reference replaces them"):
        metric.set_reference(_pixel_stats_reference(frames=4))
    assert metric.reference is None and int(metric.real_features_num_samples) == 12


def test_the_protocol_name_after_a_reset_waits_for_the_next_compute():
    metric = FrechetVideoDistance("pixel-stats")
    metric.update(_videos(), real=True)
    metric.update(_videos(seed=3), real=False)
    metric.compute()
    metric.reset()
    with pytest.raises(RuntimeError, match="known after update\\(\\) and compute\\(\\)"):
        metric.protocol_name  # the last evaluation's sample count is not this one's
    metric.update(_videos(5, seed=4), real=False)
    metric.compute()
    assert metric.protocol_name.endswith("_n5")


def test_an_extractor_whose_features_break_its_feature_dim_is_named():
    class TooNarrow(PixelStatsExtractor):
        def features(self, video):
            return super().features(video)[:, :10]

    metric = FrechetVideoDistance(TooNarrow())
    with pytest.raises(ValueError, match=r"FVD extractor 'TooNarrow' returned features of shape \(12, 10\) for 12 "
                                         r"videos, expected \(12, 96\) \(batch, its feature_dim\)"):
        metric.update(_videos(), real=True)
    assert int(metric.real_features_num_samples) == 0


def test_every_extractor_computes_its_features_without_tf32():
    class SeesTheFlags(PixelStatsExtractor):
        seen: list = []

        def features(self, video):
            self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().features(video)

    convolutions, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        FrechetVideoDistance(SeesTheFlags()).update(_videos(), real=True)
        after = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    finally:
        torch.backends.cudnn.allow_tf32 = convolutions
        torch.set_float32_matmul_precision(precision)
    assert SeesTheFlags.seen == [(False, False)] and after == (True, True)


def test_a_reference_file_from_before_extractor_settings_still_fits_an_extractor_without_settings(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, mu=np.zeros(96), sigma=np.eye(96), extractor="pixel-stats", weights_hash="", frames=4, height=16,
             width=16, num_samples=10)
    stats = ReferenceStats.load(path)
    assert stats.extractor_settings == {} and stats.requested_samples == 10
    FrechetVideoDistance("pixel-stats").set_reference(stats)


@pytest.mark.parametrize("damage, problem", [
    ({"frames": np.array([4, 4])}, "only 0-dimensional arrays"),  # was a TypeError traceback
    ({"extractor_settings": np.str_("{not json")}, "Expecting property name"),
    ({"mu": np.full(96, np.nan)}, "its mean or covariance holds NaN or inf"),  # was refused after every video
    ({"frames": np.array(0)}, "0 frames of 16x16 from 10 samples"),  # was numpy's "need at least one array"
    ({"num_samples": np.array(1)}, "4 frames of 16x16 from 1 samples"),
    ({"mu": np.zeros((96, 1))}, "mu (96, 1) and sigma (96, 96) do not fit together"),
])
def test_a_damaged_reference_file_is_named_when_loaded(tmp_path, damage, problem):
    path = _pixel_stats_reference().save(tmp_path / "reference.npz")
    np.savez(path, **{**dict(np.load(path)), **damage})
    with pytest.raises(ValueError) as refused:
        ReferenceStats.load(path)
    assert str(refused.value).startswith(f"{path} is a damaged FVD reference file (")
    assert problem in str(refused.value) and str(refused.value).endswith("; compute it again")


def test_non_finite_features_are_refused_naming_the_extractor_and_how_many_videos():
    class BrokenWeights(PixelStatsExtractor):
        def features(self, video):
            features = super().features(video)
            features[1, 3] = float("nan")
            features[4] = float("inf")
            return features

    metric = FrechetVideoDistance(BrokenWeights())
    with pytest.raises(ValueError, match=r"FVD extractor 'BrokenWeights' gave NaN or inf features for 2 of the 12 "
                                         r"videos of this batch; check its weights file"):
        metric.update(_videos(), real=True)
    assert int(metric.real_features_num_samples) == 0 and not metric.real_features_sum.isnan().any()


def test_a_reference_file_with_another_feature_count_is_named_with_what_to_do(tmp_path):
    narrower = ReferenceStats(mu=np.zeros(50), sigma=np.eye(50), extractor="pixel-stats", weights_hash="", frames=4,
                              height=16, width=16, num_samples=10, source="raw/train")
    path = narrower.save(tmp_path / "old.npz")
    with pytest.raises(ValueError) as refused:
        FrechetVideoDistance("pixel-stats").set_reference(path)
    assert str(refused.value) == (f"FVD reference {path} (computed from raw/train) has 50 features, the extractor "
                                  "'pixel-stats' gives 96: it changed since; recompute it with "
                                  "`flowvid data fvd-stats RAW_DIR --extractor pixel-stats`")
    with pytest.raises(ValueError, match=r"^FVD reference \(computed from raw/train\) has 50 features"):
        FrechetVideoDistance("pixel-stats").set_reference(narrower)  # held in memory: no file to name
