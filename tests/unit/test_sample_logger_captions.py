"""What `SampleVideoLogger` samples when no captions are given: the first captions of the validation shards."""

import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from flowvid.data import VideoShardDataModule
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import iter_tar, shard_paths
from flowvid.data.synthetic import write_synthetic_dataset
from flowvid.lit.callbacks import SampleVideoLogger

FRAMES, SIZE = 2, 8


class CaptionRecorder(L.LightningModule):
    """Trains one weight and samples grey videos, keeping the captions it was asked to sample."""

    def __init__(self, reads_text: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.text_encoder = torch.nn.Identity() if reads_text else None
        self.sampled_captions: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["video"].float().mean()).square()

    def generate_videos(self, captions, seed):
        self.sampled_captions.append(list(captions))
        return torch.full((len(captions), FRAMES, SIZE, SIZE, 3), 128, dtype=torch.uint8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(root, num_videos=4, frames=FRAMES, size=SIZE, val_videos=6, shard_samples=2)
    return root


def stored_captions(folder) -> list[str]:
    """Every caption of a shard folder, in the order its manifest lists the shards."""
    return [raw["txt"].decode() for shard in shard_paths(folder, load_manifest(folder)) for raw in iter_tar(shard)]


def test_without_captions_the_logger_samples_the_first_captions_of_the_validation_shards(shapes, tmp_path):
    logger = SampleVideoLogger(every_n_steps=1, from_validation=3)  # two validation shards of two clips
    model = CaptionRecorder()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[logger], default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=VideoShardDataModule(str(shapes / "train"), str(shapes / "val"), batch_size=2))

    expected = stored_captions(shapes / "val")[:3]
    assert len(set(expected)) > 1 and all(expected)  # captions the model can tell apart, not one repeated
    assert model.sampled_captions == [expected]
    assert (tmp_path / "samples" / "captions.txt").read_text() == "".join(f"{caption}\n" for caption in expected)


def trainer_of(datamodule) -> SimpleNamespace:
    return SimpleNamespace(datamodule=datamodule, callbacks=[])


def test_given_captions_are_sampled_whatever_the_validation_shards_hold(shapes):
    logger = SampleVideoLogger(captions=["a red circle moves left"])
    logger.setup(trainer_of(VideoShardDataModule(str(shapes / "train"), str(shapes / "val"))), CaptionRecorder(), "fit")
    assert logger.captions == ["a red circle moves left"]


def test_without_a_text_encoder_or_validation_shards_the_logger_samples_one_unconditional_video(shapes):
    with_validation = VideoShardDataModule(str(shapes / "train"), str(shapes / "val"))
    without_validation = VideoShardDataModule(str(shapes / "train"))
    for trainer, model in [(trainer_of(with_validation), CaptionRecorder(reads_text=False)),
                           (trainer_of(without_validation), CaptionRecorder()),
                           (trainer_of(None), CaptionRecorder())]:  # loaders given to fit, no data module
        logger = SampleVideoLogger()
        logger.setup(trainer, model, "fit")
        assert logger.captions == [""]


@pytest.mark.parametrize("count", [0, -2, 2.5, True])
def test_a_count_of_validation_captions_that_is_no_count_is_refused(count):
    with pytest.raises(ValueError, match=re.escape(f"SampleVideoLogger from_validation must be a whole number >= 1, "
                                                   f"got {count!r}")):
        SampleVideoLogger(from_validation=count)
