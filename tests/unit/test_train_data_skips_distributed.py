"""The skipped-sample counts a DDP run logs are those of all its ranks, and a resumed run goes on from them
(two gloo processes)."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from processes import run_in_gloo_group

WORLD_SIZE = 2
BATCHES_PER_EPOCH = 2
STEPS = 2 * BATCHES_PER_EPOCH
# What each rank's data skips for every batch: the ranks differ, in counts and reasons.
SKIPS = [{"bad_caption": 1}, {"broken_tar": 3}]


class SkippingData(L.LightningDataModule):
    """Counts skipped samples as VideoShardDataModule does (its checkpoint state holds them, and a resumed
    run starts from them), skipping the rank's ``SKIPS`` for every batch."""

    def __init__(self):
        super().__init__()
        self.skipped: dict[str, int] = {}

    def skipped_counts(self) -> dict[str, int]:
        return dict(self.skipped)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped_counts()}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = dict(state["skipped"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Batches(self, SKIPS[self.trainer.global_rank]), batch_size=None)


class Batches(Dataset):
    def __init__(self, data: SkippingData, skips: dict[str, int]):
        self.data, self.skips = data, skips

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __getitem__(self, index: int) -> dict:
        for reason, count in self.skips.items():
            self.data.skipped[reason] = self.data.skipped.get(reason, 0) + count
        video = torch.randint(0, 256, (2, 2, 4, 4, 3), generator=torch.Generator().manual_seed(index))
        return {"video": video.to(torch.uint8), "caption": ["a", "b"], "key": ["0", "1"]}


class SkipLog(L.Callback):
    """The ``data/skipped_*`` metrics logged at each step."""

    def __init__(self):
        self.logged = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged[trainer.global_step] = {name: float(value) for name, value in trainer.callback_metrics.items()
                                            if name.startswith("data/")}


def fit(max_steps: int, resume: str | None = None, save: str | None = None) -> SkipLog:
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 2))
    module = FlowModule(flow, PixelCodec(patch_size=2), None, None, video_shape=(2, 4, 4))
    data = SkippingData()
    log = SkipLog()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[log])
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    return log


def fit_halted_and_resumed(rank: int, out_dir) -> dict:
    """The logs of a whole run, and of the same run resumed from its checkpoint halfway."""
    whole = fit(STEPS)
    checkpoint = os.path.join(out_dir, "half.ckpt")
    fit(STEPS // 2, save=checkpoint)
    resumed = fit(STEPS, resume=checkpoint)
    return {"whole": whole.logged, "resumed": resumed.logged}


@pytest.mark.slow
def test_logged_skip_counts_sum_the_ranks_and_a_resumed_run_goes_on_from_them(tmp_path):
    results = run_in_gloo_group(fit_halted_and_resumed, tmp_path, WORLD_SIZE)

    # Four batches of both ranks' SKIPS.
    expected = {"data/skipped_samples": 16.0, "data/skipped_bad_caption": 4.0, "data/skipped_broken_tar": 12.0}
    for result in results:
        assert result["whole"][STEPS] == expected
        # as many as the uninterrupted run at every step, not rank 0's counts once per rank
        assert result["resumed"] == {step: result["whole"][step] for step in range(STEPS // 2 + 1, STEPS + 1)}
