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


class CountingCodec(torch.nn.Module):
    """Latents are pixels in [0, 1]; counts its decodes (a sharded codec gathers its weights in each one)."""

    def __init__(self):
        super().__init__()
        self.decodes = 0

    def decode(self, latents):
        self.decodes += 1
        return (latents.clamp(0, 1) * 255).round().to(torch.uint8)


class CaptionedRandomVideos(RandomVideos):
    """Records each sampling call's captions and seed; the videos depend on both."""

    def __init__(self):
        super().__init__()
        self.codec = CountingCodec()
        self.calls = []

    def generate_videos(self, captions, seed):
        self.calls.append((tuple(captions), seed))
        videos = super().generate_videos(captions, seed)
        brightness = torch.tensor([len(caption) for caption in captions], dtype=torch.uint8)
        return videos // 2 + brightness.view(-1, 1, 1, 1, 1) * 10


CAPTIONS = ["a", "bb", "ccc"]


def fvd_of_captioned_clips(devices: int) -> dict:
    """One step with an FVD of 6 samples against 3 validation clips (as latents) with captions."""
    latents = clips(3).float() / 255
    val = [{"latents": latents[i], "key": f"clip{i}", "caption": CAPTIONS[i]} for i in range(3)]
    fvd = FVDCallback(every_n_steps=1, num_samples=6, extractor="pixel-stats", reference="val", batch_size=2, seed=10)
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[fvd])
    module = CaptionedRandomVideos()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader([torch.ones(2)], batch_size=1), DataLoader(val, batch_size=1))
    (value,) = [float(value) for name, value in trainer.callback_metrics.items() if name.startswith("fvd")]
    return {"fvd": value, "calls": module.calls, "real_decodes": module.codec.decodes}


@pytest.mark.slow
def test_the_fvd_samples_the_same_captions_and_noise_on_any_number_of_processes(tmp_path):
    """Rank 0 reads clips 0 and 2, rank 1 clips 1 and 0 (padding, left out): every process prompts with the
    captions of all three clips, and sample i gets the caption and noise it gets in one process."""
    alone = fvd_of_captioned_clips(devices=1)
    assert alone["calls"] == [(("a", "bb"), 10), (("ccc", "a"), 12), (("bb", "ccc"), 14)]

    ranks = run_in_gloo_group(lambda rank, out_dir: fvd_of_captioned_clips(WORLD_SIZE), tmp_path, WORLD_SIZE)
    counted = ranks[0]["calls"] + ranks[1]["calls"][:-1]  # rank 1's last call only keeps it in step
    assert sorted(counted, key=lambda call: call[1]) == alone["calls"]
    assert ranks[0]["fvd"] == ranks[1]["fvd"] == pytest.approx(alone["fvd"], rel=1e-6)


@pytest.mark.slow
def test_every_process_decodes_the_real_clips_as_often(tmp_path):
    """Rank 1 takes no clip in the second round (its clip 0 is rank 0's); a sharded codec would wait for it."""
    ranks = run_in_gloo_group(lambda rank, out_dir: fvd_of_captioned_clips(WORLD_SIZE), tmp_path, WORLD_SIZE)
    assert ranks[0]["real_decodes"] == ranks[1]["real_decodes"] == 2


def refusal_of_one_process_in_a_ddp_fit(rank: int, out_dir) -> str:
    """The error each process ends with when only process 1's metric refuses its generated features."""
    if rank == 1:
        def refuse(self, videos, real):
            raise ValueError("FVD extractor 'pixel-stats' gave NaN or inf features for 2 of the 2 videos")

        FrechetVideoDistance.update = refuse
    fvd = FVDCallback(every_n_steps=1, num_samples=4, extractor="pixel-stats", reference="val", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[fvd])
    val = [{"video": video, "key": f"clip{i}"} for i, video in enumerate(clips(4))]
    with pytest.raises(ValueError) as refused:
        trainer.fit(RandomVideos(), DataLoader([torch.ones(2)], batch_size=1), DataLoader(val, batch_size=1))
    return str(refused.value)


@pytest.mark.slow
def test_a_refusal_of_one_process_ends_every_process_with_its_reason(tmp_path):
    results = run_in_gloo_group(refusal_of_one_process_in_a_ddp_fit, tmp_path, WORLD_SIZE)
    assert results[1] == "FVD extractor 'pixel-stats' gave NaN or inf features for 2 of the 2 videos"
    assert results[0] == "FVDCallback: the FVD metric refused the features of 1 other process(es); their log says why"
