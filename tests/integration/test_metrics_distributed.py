"""Metric states summed across 2 gloo processes give the statistics of the whole set."""

import pytest
import torch

from flowvid.metrics import BitsPerDim, FrechetVideoDistance, PixelStatsExtractor
from processes import run_in_gloo_group

WORLD_SIZE = 2


def _videos(seed: int, count: int = 6, shift: int = 0) -> torch.Tensor:
    videos = torch.randint(0, 200, (count, 3, 8, 8, 3), generator=torch.Generator().manual_seed(seed))
    return (videos + shift).to(torch.uint8)


def _bits(seed: int) -> torch.Tensor:
    return torch.rand(3 + seed, 2, generator=torch.Generator().manual_seed(100 + seed)) * 4


def metrics_of_half_the_videos(rank: int, out_dir) -> dict:
    """FVD and bits/dim of this process's half of each set, synced over both processes."""
    fvd = FrechetVideoDistance(PixelStatsExtractor())  # an instance: no plugin discovery in the workers
    fvd.update(_videos(seed=rank), real=True)  # each process holds half of each set
    fvd.update(_videos(seed=10 + rank, shift=30), real=False)
    value = float(fvd.compute())

    bits = BitsPerDim(num_frames=2)
    bits.update(_bits(rank))  # 3 samples on rank 0, 4 on rank 1
    return {
        "fvd": value,
        "name": fvd.protocol_name,
        "local_fake_count": int(fvd.fake_features_num_samples),
        "bits": float(bits.compute()),
        "bits_per_frame": bits.compute_per_frame(),
    }


@pytest.mark.slow
def test_fvd_and_bits_per_dim_sync_across_two_gloo_processes(tmp_path):
    results = run_in_gloo_group(metrics_of_half_the_videos, tmp_path, WORLD_SIZE)

    whole = FrechetVideoDistance("pixel-stats")
    whole.update(torch.cat([_videos(seed=r) for r in range(WORLD_SIZE)]), real=True)
    whole.update(torch.cat([_videos(seed=10 + r, shift=30) for r in range(WORLD_SIZE)]), real=False)
    expected = float(whole.compute())
    all_bits = torch.cat([_bits(r) for r in range(WORLD_SIZE)]).double()

    for result in results:
        assert result["fvd"] == pytest.approx(expected, rel=1e-9)
        assert result["name"] == "fvd_debug/pixel-stats_f3_r8_n12"  # the sample count of both processes
        assert result["local_fake_count"] == 6  # states are this process's own again after compute()
        assert result["bits"] == pytest.approx(float(all_bits.mean()), rel=1e-12)
        torch.testing.assert_close(result["bits_per_frame"], all_bits.mean(dim=0))
