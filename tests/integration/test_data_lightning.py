"""The DataModule under a Lightning Trainer: fixed epochs, manifest check in setup, batch-exact resume."""

import lightning as L
import pytest
import torch

from flowvid.data import SyntheticVideoDataModule, load_manifest


class KeyRecorder(L.LightningModule):
    """Trains nothing; records the keys of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def setup(self, stage):
        self.trainer.datamodule.check_compatible(video_shape=(4, 16, 16))

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        return (self.weight * batch["video"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(root, checkpoints, resume=None):
    data = SyntheticVideoDataModule(str(root), num_videos=32, val_videos=4, frames=4, size=16, shard_samples=8,
                                    batch_size=4, num_workers=2, shuffle_buffer=8, batches_per_epoch=5)
    model = KeyRecorder()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[saver])
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    return model.keys


@pytest.mark.slow
def test_resume_mid_epoch_continues_the_same_batches(tmp_path):
    full = fit(tmp_path / "data", tmp_path / "ckpt")
    assert len(full) == 10 and full[:5] != full[5:]  # two epochs of five batches, in a new order each
    for step in (3, 6):  # mid epoch 0, and one batch into epoch 1
        checkpoint = next((tmp_path / "ckpt").glob(f"*step={step}.ckpt"))
        assert fit(tmp_path / "data", tmp_path / f"again{step}", resume=str(checkpoint)) == full[step:]



def test_prepare_data_keeps_a_dataset_made_with_the_same_recipe(tmp_path):
    settings = dict(num_videos=8, val_videos=2, frames=2, size=8, shard_samples=4)
    SyntheticVideoDataModule(str(tmp_path), **settings).prepare_data()
    manifest = tmp_path / "train" / "manifest.json"
    made = manifest.stat().st_mtime_ns
    SyntheticVideoDataModule(str(tmp_path), **settings).prepare_data()
    assert manifest.stat().st_mtime_ns == made  # recognised, not written again
    with pytest.warns(UserWarning, match=r"other settings: they differ in size \(8 there, 12 here\); writing"):
        SyntheticVideoDataModule(str(tmp_path), **{**settings, "size": 12}).prepare_data()
    assert manifest.stat().st_mtime_ns != made


def test_prepare_data_reuses_a_narrowed_dataset_that_make_synthetic_wrote(tmp_path):
    from data_tools.cli import main as data_main

    assert data_main(["make-synthetic", "--out", str(tmp_path), "--num-videos", "8", "--val-videos", "2",
                      "--frames", "2", "--size", "8", "--shard-samples", "4", "--max-objects", "1",
                      "--backgrounds", "plain"]) == 0
    manifest = tmp_path / "train" / "manifest.json"
    made = manifest.read_bytes(), manifest.stat().st_mtime_ns
    settings = dict(num_videos=8, val_videos=2, frames=2, size=8, shard_samples=4)
    SyntheticVideoDataModule(str(tmp_path), **settings, max_objects=1, backgrounds=["plain"]).prepare_data()
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == made  # recognised, not written again
    with pytest.warns(UserWarning, match=r"max_objects \(1 there, 2 here\)"):
        SyntheticVideoDataModule(str(tmp_path), **settings).prepare_data()
    assert load_manifest(tmp_path / "train")["source"]["recipe"]["max_objects"] == 2
