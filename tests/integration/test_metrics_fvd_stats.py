"""``flowvid data fvd-stats``: reference statistics of a raw shard folder, cached, and used by the metric."""

import numpy as np
import pytest
import torch

from data_tools.cli import main as data_main
from data_tools.fvd_stats import reference_stats
from flowvid.data import write_synthetic_dataset
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import SampleSpec, decode_sample, iter_tar, shard_paths
from flowvid.metrics import FrechetVideoDistance, PixelStatsExtractor, ReferenceStats


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
    assert stats.key() == {"extractor": "pixel-stats", "weights_hash": "", "frames": 3, "height": 16, "width": 16,
                           "num_samples": 10}

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


def test_broken_shards_are_skipped_and_counted(raw_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in raw_folder.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    first_shard = sorted(broken.glob("shard-*.tar"))[0]
    first_shard.write_bytes(first_shard.read_bytes()[:3000])  # cut inside the first sample
    skipped: list = []
    stats = reference_stats(broken, FrechetVideoDistance(PixelStatsExtractor()), skipped=skipped)
    assert stats.num_samples == 12 - 5  # the first shard held 5 clips
    assert len(skipped) == 1 and skipped[0]["reason"].startswith("broken_tar")


def test_clear_errors(raw_folder, tmp_path, capsys):
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--frames", "9"]) == 2
    assert "between 1 and the clips' 4 frames" in capsys.readouterr().err
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "i3d",
                      "--extractor-args", f'{{"weights": "{tmp_path}/i3d_pretrained_400.pt"}}']) == 2
    assert "i3d_pretrained_400.pt" in capsys.readouterr().err
    assert data_main(["fvd-stats", str(tmp_path), "--extractor", "pixel-stats"]) == 2
    assert "manifest.json" in capsys.readouterr().err
