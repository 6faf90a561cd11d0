"""``flowvid data fvd-stats``: reference statistics of a raw shard folder, cached, and used by the metric."""

import json
import re

import numpy as np
import pytest
import torch

from data_tools.cli import main as data_main
from data_tools.fvd_stats import reference_stats
from flowvid.data import write_synthetic_dataset
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import SampleSpec, decode_sample, iter_tar, shard_paths
from flowvid.metrics import FrechetVideoDistance, PixelStatsExtractor, ReferenceStats
from flowvid.registry import FVD_EXTRACTORS


class ScaledPixelStats(PixelStatsExtractor):
    """pixel-stats times ``scale``: an extractor with a setting that changes its features, as I3D's resolution does."""

    standard_settings = {"scale": 1}

    def __init__(self, scale: float = 1):
        super().__init__()
        self.scale = scale

    def settings(self):
        return {"scale": self.scale}

    def features(self, video):
        return super().features(video) * self.scale


@pytest.fixture
def scaled_extractor(monkeypatch):
    monkeypatch.setattr(FVD_EXTRACTORS, "_entries", dict(FVD_EXTRACTORS._entries))  # restored after the test
    FVD_EXTRACTORS.add("scaled-pixel-stats", ScaledPixelStats)


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=12, frames=4, size=16, val_videos=4, shard_samples=5)
    return root / "train"


def _clips(folder, frames):
    manifest = load_manifest(folder)
    spec = SampleSpec.from_manifest(manifest)
    return torch.from_numpy(np.stack([decode_sample(raw, spec)["video"][:frames]
                                      for shard in shard_paths(folder, manifest) for raw in iter_tar(shard)]))


def test_statistics_are_written_under_their_key_cached_and_reused(raw_folder, capsys):
    args = ["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--frames", "3", "--max-samples", "10", "--batch-size", "4"]
    assert data_main(args) == 0
    path = raw_folder / "fvd_stats" / "pixel-stats_noweights_f3_r16x16_n10.npz"
    stats = ReferenceStats.load(path)
    assert stats.key() == {"extractor": "pixel-stats", "extractor_settings": {}, "weights_hash": "", "frames": 3,
                           "height": 16, "width": 16, "num_samples": 10}

    expected = FrechetVideoDistance(PixelStatsExtractor())
    expected.update(_clips(raw_folder, frames=3)[:10], real=True)
    reference = expected.real_statistics()
    np.testing.assert_allclose(stats.mu, reference.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, reference.sigma, rtol=1e-9, atol=1e-15)

    modified = path.stat().st_mtime_ns
    capsys.readouterr()
    assert data_main(args) == 0
    assert "cached" in capsys.readouterr().err and path.stat().st_mtime_ns == modified
    assert data_main([*args, "--force"]) == 0
    assert path.stat().st_mtime_ns != modified

    metric = FrechetVideoDistance("pixel-stats")
    metric.set_reference(path)
    metric.update(_clips(raw_folder, frames=3)[:10], real=False)
    assert float(metric.compute()) < 1e-9  # the same clips as the reference


def copy_with_first_shard_cut(raw_folder, tmp_path):
    """A copy of ``raw_folder`` whose first shard is cut inside its first sample."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in raw_folder.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    first_shard = sorted(broken.glob("shard-*.tar"))[0]
    first_shard.write_bytes(first_shard.read_bytes()[:3000])
    return broken


def test_broken_shards_are_skipped_and_counted(raw_folder, tmp_path):
    broken = copy_with_first_shard_cut(raw_folder, tmp_path)
    skipped: list = []
    stats = reference_stats(broken, FrechetVideoDistance(PixelStatsExtractor()), skipped=skipped)
    assert stats.num_samples == 12 - 5  # the first shard held 5 clips
    assert len(skipped) == 1 and skipped[0]["reason"].startswith("broken_tar")
    assert skipped[0]["samples"] == 5 and stats.requested_samples == 12


def test_clear_errors(raw_folder, tmp_path, capsys):
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--frames", "9"]) == 2
    assert "between 1 and the clips' 4 frames" in capsys.readouterr().err
    for frames in ("0", "-1"):  # 0 meant all frames
        assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--frames", frames]) == 2
        assert f"--frames must be >= 1, got {frames}" in capsys.readouterr().err
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "i3d",
                      "--extractor-args", f'{{"weights": "{tmp_path}/i3d_pretrained_400.pt"}}']) == 2
    assert "i3d_pretrained_400.pt" in capsys.readouterr().err
    assert data_main(["fvd-stats", str(tmp_path), "--extractor", "pixel-stats"]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_statistics_of_a_folder_that_lost_samples_are_named_by_what_they_hold_and_reused(raw_folder, tmp_path,
                                                                                         capsys):
    broken = copy_with_first_shard_cut(raw_folder, tmp_path)  # its 5 clips are lost
    args = ["fvd-stats", str(broken), "--extractor", "pixel-stats"]
    assert data_main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"skipped: broken_tar\s*│\s*5\s*│", err), err  # the samples lost, not the one shard
    [written] = (broken / "fvd_stats").iterdir()
    assert written.name == "pixel-stats_noweights_f4_r16x16_n7.npz" and ReferenceStats.load(written).num_samples == 7
    modified = written.stat().st_mtime_ns
    assert data_main(args) == 0
    assert f"cached {written}" in " ".join(capsys.readouterr().err.split())
    assert written.stat().st_mtime_ns == modified


def test_another_extractor_setting_is_computed_afresh_and_refused_by_the_other_metric(raw_folder, tmp_path, capsys,
                                                                                      scaled_extractor):
    out = tmp_path / "reference.npz"
    args = ["fvd-stats", str(raw_folder), "--extractor", "scaled-pixel-stats", "--out", str(out)]
    assert data_main([*args, "--extractor-args", '{"scale": 2}']) == 0
    capsys.readouterr()
    assert data_main([*args, "--extractor-args", '{"scale": 3}']) == 0
    assert "cached" not in capsys.readouterr().err  # the same --out held the statistics of scale 2
    stats = ReferenceStats.load(out)
    assert stats.extractor_settings == {"scale": 3}
    with pytest.raises(ValueError, match=r"has extractor_settings \{'scale': 3\}, this metric's extractor has "
                                         r"\{'scale': 2\}"):
        FrechetVideoDistance(ScaledPixelStats(scale=2)).set_reference(out)

    default = ["fvd-stats", str(raw_folder), "--extractor", "scaled-pixel-stats", "--extractor-args", '{"scale": 2}']
    assert data_main(default) == 0
    assert (raw_folder / "fvd_stats" / "scaled-pixel-stats-scale2_noweights_f4_r16x16_n12.npz").is_file()


def test_fvd_takes_the_extractor_settings_of_its_reference_and_refuses_others(raw_folder, tmp_path, capsys,
                                                                             scaled_extractor):
    generated = tmp_path / "generated"
    generated.mkdir()
    for index, clip in enumerate(_clips(raw_folder, frames=4)[:3]):
        np.save(generated / f"{index}.npy", clip.numpy())
    reference = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "scaled-pixel-stats", "--extractor-args",
                      '{"scale": 2}', "--out", str(reference)]) == 0
    capsys.readouterr()
    assert data_main(["fvd", str(generated), "--reference", str(reference)]) == 0
    protocol = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"]
    assert protocol == "fvd_debug/scaled-pixel-stats-scale2_f4_r16_n3"

    assert data_main(["fvd", str(generated), "--reference", str(reference), "--extractor-args", '{"scale": 3}']) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"--reference {reference} (computed from {raw_folder}) has extractor_settings {{'scale': 2}}, the "
            "extractor has {'scale': 3}") in err


def test_statistics_kept_for_other_clips_are_computed_afresh(raw_folder, tmp_path, capsys):
    other = tmp_path / "other"
    write_synthetic_dataset(other, num_videos=12, frames=4, size=16, val_videos=4, shard_samples=5, seed=1)
    out = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(out)]) == 0
    capsys.readouterr()
    # Another folder with the same key (extractor, frames, resolution, samples) at the same --out.
    assert data_main(["fvd-stats", str(other / "train"), "--extractor", "pixel-stats", "--out", str(out)]) == 0
    assert "cached" not in capsys.readouterr().err
    expected = FrechetVideoDistance(PixelStatsExtractor())
    expected.update(_clips(other / "train", frames=4), real=True)
    np.testing.assert_allclose(ReferenceStats.load(out).mu, expected.real_statistics().mu, rtol=1e-12)
