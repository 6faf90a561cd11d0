"""FVD against the validation set under DDP (two gloo processes): the real set holds each validation clip
once, although Lightning's distributed sampler pads the ranks' shares with repeated clips."""

import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from flowvid.lit.callbacks import FVDCallback
from flowvid.metrics import FrechetVideoDistance
from processes import run_in_gloo_group

WORLD_SIZE = 2
FRAMES, SIZE = 2, 8


def clips(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (count, FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)


class RandomVideos(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch).square().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def generate_videos(self, captions, seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (len(captions), FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def real_statistics_of_a_ddp_fit(rank: int, out_dir) -> dict:
    """The real statistics summed over the processes, and the warnings, of one step with an FVD evaluation."""
    # 3 clips on 2 ranks: the sampler deals clips 0, 2 to rank 0 and 1, 0 to rank 1.
    val = [{"video": video, "key": f"clip{i}"} for i, video in enumerate(clips(3))]
    fvd = FVDCallback(every_n_steps=1, num_samples=4, extractor="pixel-stats", reference="val", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[fvd])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(RandomVideos(), DataLoader([torch.ones(2)], batch_size=1), DataLoader(val, batch_size=1))
    real = {name: getattr(fvd.metric, f"real_features_{name}").clone() for name in ("sum", "cov_sum", "num_samples")}
    for value in real.values():
        dist.all_reduce(value)
    return {"real": real, "warnings": [str(warning.message) for warning in caught]}


@pytest.mark.slow
def test_the_real_set_holds_each_validation_clip_once_over_the_processes(tmp_path):
    results = run_in_gloo_group(real_statistics_of_a_ddp_fit, tmp_path, WORLD_SIZE)

    whole = FrechetVideoDistance("pixel-stats")
    whole.update(clips(3), real=True)
    real = results[0]["real"]
    assert int(real["num_samples"]) == 3
    torch.testing.assert_close(real["sum"], whole.real_features_sum)
    torch.testing.assert_close(real["cov_sum"], whole.real_features_cov_sum)
    assert any("the validation data gave 3 distinct real videos, 4 were asked for" in message
               for message in results[0]["warnings"])
