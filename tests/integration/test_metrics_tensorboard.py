"""A tiny Lightning run with the sample-video and FVD callbacks; the TensorBoard event files are read back."""

import io

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from flowvid.lit.callbacks import FVDCallback, Offer, SampleVideoLogger, Samples, generate, take_new_clips
from flowvid.lit.tensorboard import frame_grid, gif_bytes, tile_videos
from flowvid.metrics import BitsPerDim, FrechetVideoDistance, ReferenceStats

FRAMES, SIZE = 4, 16


def random_videos(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)


class ClampCodec(torch.nn.Module):
    """Latents are pixels in [0, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.clamp(0, 1) * 255).round().to(torch.uint8)


class RandomVideoModule(L.LightningModule):
    """Trains one weight; samples random videos; validation reports made-up per-frame bits/dim."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.codec = ClampCodec()
        self.val_bits_per_dim = BitsPerDim(num_frames=FRAMES)
        self.seeds_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["x"]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.val_bits_per_dim.update(batch["latents"].mean(dim=(2, 3, 4)) * 8)

    def on_validation_epoch_end(self):
        self.log_dict(self.val_bits_per_dim.scalars("val/bits_per_dim"))
        self.val_bits_per_dim.reset()

    def generate_videos(self, captions, seed):
        assert not self.training and not torch.is_grad_enabled()
        self.seeds_seen.append(seed)
        return random_videos(len(captions), seed)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _val_latents(count: int = 8) -> torch.Tensor:
    return torch.rand(count, FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(7))


def test_event_files_hold_the_video_fvd_and_bits_per_dim(tmp_path):
    train = [{"x": torch.randn(2)} for _ in range(3)]
    latents = _val_latents()
    val = [{"latents": latents[i], "caption": f"clip {i}"} for i in range(len(latents))]
    model = RandomVideoModule()
    samples = SampleVideoLogger(every_n_steps=2, captions=["a red ball", "a blue bar"], seed=5, fps=4)
    fvd = FVDCallback(every_n_steps=2, num_samples=6, extractor="pixel-stats", reference="val", batch_size=4, seed=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"),
                        callbacks=[samples, fvd], num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, DataLoader(train, batch_size=1), DataLoader(val, batch_size=4))

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    assert {"samples/video", "samples/frames"} <= set(tags["images"])
    (video,) = events.Images("samples/video")
    # Sampled after optimiser step 2, and logged at that step (the checkpoint of those weights is step=2).
    assert video.step == 2 and video.encoded_image_string.startswith(b"GIF8")
    assert (video.width, video.height) == (2 * SIZE, SIZE)  # the two prompts side by side
    assert Image.open(io.BytesIO(video.encoded_image_string)).n_frames == FRAMES
    (grid,) = events.Images("samples/frames")
    assert (grid.width, grid.height) == (FRAMES * SIZE, 2 * SIZE)
    assert "samples/captions/text_summary" in tags["tensors"]

    name = "fvd_debug/pixel-stats_f4_r16_n6"
    (logged,) = events.Scalars(name)
    assert logged.step == 2
    assert model.seeds_seen == [5, 0, 4]  # the prompts, then two FVD batches of 4 and 2 samples

    expected = FrechetVideoDistance("pixel-stats")
    expected.update(ClampCodec().decode(latents[:6]), real=True)
    expected.update(torch.cat([random_videos(4, 0), random_videos(2, 4)]), real=False)
    assert logged.value == pytest.approx(float(expected.compute()), rel=1e-5)

    assert "val/bits_per_dim" in tags["scalars"] and "val/bits_per_dim/frame_03" in tags["scalars"]
    assert events.Scalars("val/bits_per_dim")[-1].value == pytest.approx(float(latents.mean() * 8), rel=1e-5)


def test_measuring_fvd_against_the_validation_videos_leaves_training_random_numbers_alone():
    class NoisyModule(RandomVideoModule):
        def training_step(self, batch, batch_idx):
            self.noise.append(torch.rand(1).item())  # what a noise-augmented step draws
            return super().training_step(batch, batch_idx)

    draws = {}
    for with_fvd in (False, True):
        torch.manual_seed(0)
        model = NoisyModule()
        model.noise = []
        callbacks = [FVDCallback(every_n_steps=1, num_samples=2, extractor="pixel-stats", reference="val",
                                 batch_size=2)] if with_fvd else []
        latents = _val_latents()
        val = [{"latents": latents[i], "caption": f"clip {i}"} for i in range(len(latents))]
        L.Trainer(max_steps=3, accelerator="cpu", logger=False, callbacks=callbacks, num_sanity_val_steps=0,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model, DataLoader([{"x": torch.randn(2)} for _ in range(3)], batch_size=1),
                                           DataLoader(val, batch_size=4))
        draws[with_fvd] = model.noise
    assert len(draws[True]) == 3 and draws[True] == draws[False]


def test_a_reference_of_other_frames_than_the_model_generates_fails_before_the_first_step(tmp_path):
    reference = ReferenceStats(mu=np.zeros(96), sigma=np.eye(96), extractor="pixel-stats", weights_hash="",
                               frames=2 * FRAMES, height=SIZE, width=SIZE, num_samples=10).save(tmp_path / "ref.npz")
    model = RandomVideoModule()
    model.video_shape = (FRAMES, SIZE, SIZE)  # what FlowModule says it generates
    fvd = FVDCallback(every_n_steps=1, num_samples=2, extractor="pixel-stats", reference=reference, batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[fvd], num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=rf"reference {reference} holds videos of \(frames, height, width\) "
                                         rf"\(8, 16, 16\), RandomVideoModule generates \(4, 16, 16\)"):
        trainer.fit(model, DataLoader([{"x": torch.randn(2)} for _ in range(2)], batch_size=1))
    assert trainer.global_step == 0 and model.seeds_seen == []


def test_tiles_and_grid_keep_every_pixel_in_place():
    videos = torch.randint(0, 256, (2, 3, 4, 5, 3), dtype=torch.uint8)
    tiled = tile_videos(videos)
    assert tiled.shape == (3, 4, 10, 3)
    assert (tiled[2, :, 5:] == videos[1, 2].numpy()).all()
    grid = frame_grid(videos)
    assert grid.shape == (3, 8, 15)
    assert torch.equal(grid[:, 4:, 10:].permute(1, 2, 0), videos[1, 2])


def test_sampling_leaves_the_global_random_state_and_the_training_mode_alone():
    model = RandomVideoModule().train()
    model.generate_videos = lambda captions, seed: (torch.rand(len(captions), FRAMES, SIZE, SIZE, 3) * 255).to(torch.uint8)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    generate(model, ["a", "b"], seed=0)
    torch.testing.assert_close(torch.rand(4), expected)
    assert model.training


def test_callbacks_refuse_bad_settings_and_bad_samples():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SampleVideoLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        FVDCallback(num_samples=1)
    model = RandomVideoModule()
    model.generate_videos = lambda captions, seed: torch.zeros(len(captions), FRAMES, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"RandomVideoModule.generate_videos: expected uint8 videos"):
        generate(model, ["x"], 0)


def test_without_tensorboard_the_samples_are_written_as_files(tmp_path):
    model = RandomVideoModule()
    samples = SampleVideoLogger(every_n_steps=2, captions=["a red ball", ""], seed=5, fps=4)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[samples],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader([{"x": torch.randn(2)} for _ in range(4)], batch_size=1))
    folder = tmp_path / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["captions.txt", "step=00000002.gif", "step=00000002.png",
                                                        "step=00000004.gif", "step=00000004.png"]
    assert (folder / "captions.txt").read_text() == "a red ball\n(unconditional)\n"
    gif = Image.open(folder / "step=00000004.gif")
    assert gif.n_frames == FRAMES and gif.size == (2 * SIZE, SIZE)
    grid = torch.from_numpy(np.asarray(Image.open(folder / "step=00000004.png")))
    assert torch.equal(grid.permute(2, 0, 1), frame_grid(random_videos(2, 5)))  # the same seed every time


def fit_with_checkpoints(tmp_path, max_steps: int, callbacks: list, logger, ckpt_path=None) -> None:
    """Four batches of RandomVideoModule, a checkpoint every second step in ``tmp_path / "ckpt"``."""
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, default_root_dir=tmp_path,
                        callbacks=[*callbacks, checkpoints], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(RandomVideoModule(), DataLoader([{"x": torch.randn(2)} for _ in range(4)], batch_size=1),
                ckpt_path=ckpt_path)


def test_a_resumed_run_does_not_log_the_prompts_of_each_sample_logger_again(tmp_path):
    def loggers():
        return [SampleVideoLogger(every_n_steps=2, captions=["a red ball"], tag=tag) for tag in ("samples", "ema")]

    fit_with_checkpoints(tmp_path, 2, loggers(), TensorBoardLogger(tmp_path, name="run"))
    fit_with_checkpoints(tmp_path, 4, loggers(), TensorBoardLogger(tmp_path, name="run"),
                         ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")

    prompts, videos = {"samples": 0, "ema": 0}, 0
    for version in sorted((tmp_path / "run").iterdir()):  # the resumed run writes version_1
        events = EventAccumulator(str(version), size_guidance={"images": 0, "tensors": 0})
        events.Reload()
        for tag in prompts:
            if f"{tag}/captions/text_summary" in events.Tags()["tensors"]:
                prompts[tag] += len(events.Tensors(f"{tag}/captions/text_summary"))
        videos += len(events.Images("samples/video"))
    assert prompts == {"samples": 1, "ema": 1} and videos == 2  # sampled at steps 2 and 4


def test_a_resumed_run_leaves_the_prompts_file_alone_unless_its_prompts_changed(tmp_path):
    fit_with_checkpoints(tmp_path, 2, [SampleVideoLogger(every_n_steps=2, captions=["a red ball"])], False)
    prompts = tmp_path / "samples" / "captions.txt"
    prompts.write_text("a red ball\n(noted by hand)\n")

    resume = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    fit_with_checkpoints(tmp_path, 4, [SampleVideoLogger(every_n_steps=2, captions=["a red ball"])], False, resume)
    assert prompts.read_text() == "a red ball\n(noted by hand)\n"
    fit_with_checkpoints(tmp_path, 4, [SampleVideoLogger(every_n_steps=2, captions=["a blue bar"])], False, resume)
    assert prompts.read_text() == "a blue bar\n"


def test_every_rank_samples_as_many_fvd_batches_so_that_synced_samplers_keep_in_step(monkeypatch):
    """17 samples over two ranks in batches of 8: 9 and 8 samples, but two sampling calls on each rank
    (a Jacobi sampler under a process group syncs its passes across ranks, call by call)."""
    from types import SimpleNamespace

    from flowvid.lit import callbacks

    calls = {0: [], 1: []}
    for rank in (0, 1):
        monkeypatch.setattr(callbacks, "generate", lambda module, captions, seed, rank=rank:
                            calls[rank].append(len(captions)) or Samples(random_videos(len(captions), seed), 0))
        fvd = FVDCallback(num_samples=17, batch_size=8, extractor="pixel-stats", captions=["a"])
        updated = []
        fvd.metric = SimpleNamespace(to=lambda device, fvd=fvd: fvd.metric, reset=lambda: None,
                                     update=lambda videos, real: updated.append(len(videos)),
                                     compute=lambda: torch.tensor(1.0), protocol_name="fvd")
        fvd._real_collected = True
        trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=4, callback_metrics={}, loggers=[],
                                  strategy=SimpleNamespace(reduce=lambda count, reduce_op: count))
        fvd.run(trainer, SimpleNamespace(device=torch.device("cpu")))
        assert sum(updated) == (9 if rank == 0 else 8)
    assert len(calls[0]) == len(calls[1]) == 2


class DivergingModule(RandomVideoModule):
    """Samples latents its codec decodes, as FlowModule does; the latents of video 1 of each call are NaN."""

    def sample_latents(self, captions, seed):
        latents = torch.rand(len(captions), FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))
        latents[1:2] = torch.nan
        return latents


def test_sampling_counts_the_videos_whose_latents_diverged():
    model = DivergingModule()
    videos, diverged = generate(model, ["a", "b", "c"], seed=0)
    assert diverged == 1 and videos.shape == (3, FRAMES, SIZE, SIZE, 3)
    assert (videos[1] == 0).all()  # what a diverged sample looks like once it is uint8: black
    assert generate(RandomVideoModule(), ["a", "b"], seed=0).diverged == 0


def test_a_diverged_sample_is_warned_about_and_the_fvd_is_logged_as_nan(tmp_path):
    latents = _val_latents()
    val = [{"latents": latents[i], "caption": f"clip {i}"} for i in range(len(latents))]
    samples = SampleVideoLogger(every_n_steps=1, captions=["a", "b"])
    fvd = FVDCallback(every_n_steps=1, num_samples=4, extractor="pixel-stats", reference="val", batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"),
                        callbacks=[samples, fvd], num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(DivergingModule(), DataLoader([{"x": torch.randn(2)}], batch_size=1), DataLoader(val, batch_size=4))
    messages = [str(warning.message) for warning in caught]
    assert any("SampleVideoLogger: 1 of 2 samples came out NaN or infinite at step 1" in m for m in messages)
    assert any("FVDCallback: 1 of 4 generated videos came out NaN or infinite at step 1; "
               "fvd_debug/pixel-stats_f4_r16_n4 is logged as NaN" in m for m in messages)
    assert trainer.callback_metrics["fvd_debug/pixel-stats_f4_r16_n4"].isnan()
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    (logged,) = events.Scalars("fvd_debug/pixel-stats_f4_r16_n4")
    assert np.isnan(logged.value)


def test_validation_data_of_fewer_than_two_videos_is_refused_by_name():
    val = [{"latents": _val_latents(1)[0], "caption": "the only clip"}]
    fvd = FVDCallback(every_n_steps=1, num_samples=4, extractor="pixel-stats", reference="val", batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[fvd], num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"FVDCallback\(reference='val'\): the validation data gave 1 real videos, "
                                         r"FVD needs at least 2; give more validation clips, or reference statistics"):
        trainer.fit(RandomVideoModule(), DataLoader([{"x": torch.randn(2)}], batch_size=1),
                    DataLoader(val, batch_size=4))


def test_each_process_takes_only_clips_that_no_process_took_before():
    def offer(keys, room):
        return Offer(keys, room, captions=[""] * len(keys), latent_shape=None)

    taken_keys = {"z"}
    offers = [offer(["a", "z", "b"], 2), None, offer(["b", "c", "a", "d"], 1), offer([None, None], 5)]
    assert take_new_clips(offers, taken_keys) == [[0, 2], [], [1], [0, 1]]  # clips without a key always count
    assert taken_keys == {"z", "a", "b", "c"}
    assert take_new_clips([offer(["a", "e", "e", "f"], 3)], taken_keys) == [[1, 3]]


def test_validation_batches_that_repeat_the_clips_give_each_real_clip_once(tmp_path):
    """``val_batches`` (6 clips' worth) over 3 validation clips: the stream reads them twice."""
    from flowvid.data.datamodule import SyntheticVideoDataModule

    class VideoBatches(RandomVideoModule):
        def training_step(self, batch, batch_idx):
            return (self.weight * batch["video"].float()).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            pass

    data = SyntheticVideoDataModule(root=str(tmp_path / "data"), num_videos=4, val_videos=3, frames=FRAMES, size=SIZE,
                                    shard_samples=4, batch_size=2, batches_per_epoch=1, val_batches=3)
    fvd = FVDCallback(every_n_steps=1, num_samples=6, extractor="pixel-stats", reference="val", batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[fvd], num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="the validation data gave 3 distinct real videos, 6 were asked for"):
        trainer.fit(VideoBatches(), datamodule=data)

    data.val_batches, data.batch_size = None, 3  # one pass over the clips, in one batch
    (every_clip,) = list(data.val_dataloader())
    expected = FrechetVideoDistance("pixel-stats")
    expected.update(every_clip["video"], real=True)
    assert int(fvd.metric.real_features_num_samples) == 3
    torch.testing.assert_close(fvd.metric.real_features_sum, expected.real_features_sum)


@pytest.mark.parametrize("fps", [8, 15, 24, 30, 50])
def test_the_gif_plays_at_the_frame_rate_asked_for(fps):
    """A GIF stores durations in 10 ms steps: 30 fps as 33 ms a frame was written as 30 ms, 10% too fast."""
    frames = random_videos(1, 0)[0].repeat(15, 1, 1, 1).numpy()  # 60 frames
    frames[:, 0, 0, 0] = np.arange(60)  # each frame differs, so none is merged into the one before
    gif = Image.open(io.BytesIO(gif_bytes(frames, fps)))
    shown_until = np.cumsum([gif.seek(k) or gif.info["duration"] for k in range(gif.n_frames)])
    assert gif.n_frames == 60
    assert np.abs(shown_until - 1000 * np.arange(1, 61) / fps).max() <= 5  # each frame ends on time, to 5 ms


def test_sample_video_logger_refuses_a_frame_rate_no_gif_plays():
    with pytest.raises(ValueError, match=r"SampleVideoLogger fps must be at most 50, got 60: GIF players show a frame "
                                         r"for at least 20 ms"):
        SampleVideoLogger(fps=60)
