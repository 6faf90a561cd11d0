"""VideoVAE: codec conformance, the linear start, a few training steps, checkpoints as codecs, the recipe."""

import json
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowvid.codecs import VideoVAE
from flowvid.codecs.vae_training import VideoVAEModule, psnr
from flowvid.registry import CODECS
from flowvid.testing.block_conformance import perturb_parameters
from flowvid.testing.codec_conformance import CodecConformance, smooth_video

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "codecs" / "video_vae_shapes.yaml"
TINY = dict(spatial_factor=2, temporal_factor=2, latent_channels=4, width=8, depth=1)


def tiny_vae(seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    vae = VideoVAE(**TINY)
    perturb_parameters(vae, seed=seed)  # the residual blocks start as the identity: give them work to do
    return vae


class TestVideoVAE(CodecConformance):
    video_shape = (5, 8, 8)

    def make_codec(self):
        return tiny_vae()


def test_registered_as_video_vae():
    assert CODECS.get("video_vae") is VideoVAE
    assert tiny_vae().latent_shape(9, 16, 8) == (5, 8, 4, 4)


def test_weights_in_bf16_encode_and_decode_in_bf16():
    """What `precision: bf16-true` makes of the codec: its input must follow its weights' dtype."""
    video = smooth_video(1, 5, 8, 8)
    full, half = tiny_vae(), tiny_vae().to(torch.bfloat16)
    latents = half.encode(video)
    assert latents.dtype == torch.bfloat16
    torch.testing.assert_close(latents.float(), full.encode(video), rtol=0.05, atol=0.05)
    assert half.decode(latents).shape == video.shape


def test_first_frame_is_encoded_alone():
    vae = tiny_vae()
    video = smooth_video(1, 5, 8, 8)
    first_only = vae.encode(video[:, :1])
    torch.testing.assert_close(vae.encode(video)[:, :1], first_only)


def test_linear_start_is_exact_when_latents_hold_a_whole_pixel_block():
    torch.manual_seed(0)
    vae = VideoVAE(spatial_factor=2, temporal_factor=1, latent_channels=12, width=16, depth=1)
    video = smooth_video(2, 3, 8, 8)
    vae.initialise_from(video)
    assert (vae.decode(vae.encode(video)).int() - video.int()).abs().max() <= 1


def test_linear_start_keeps_the_top_components():
    video = smooth_video(4, 5, 8, 8)

    def round_trip_psnr(vae: VideoVAE) -> float:
        return psnr((vae.decode(vae.encode(video)).float() - video.float()).pow(2).mean(), 255.0).item()

    quality = {}
    for channels in (3, 6, 12):
        torch.manual_seed(0)
        vae = VideoVAE(spatial_factor=2, temporal_factor=2, latent_channels=channels, width=16, depth=1)
        random_start = round_trip_psnr(vae)
        vae.initialise_from(video)
        quality[channels] = round_trip_psnr(vae)
        assert quality[channels] > random_start + 5
        latents = vae.encode(video)  # whitened: unit variance per component
        torch.testing.assert_close(latents.std(dim=(0, 1, 2, 3)), torch.ones(channels), atol=0.05, rtol=0)
    assert quality[3] < quality[6] < quality[12]


def test_more_latent_channels_than_pixel_values_is_refused_for_training():
    # 3 x 1 x 2^2 = 12 values per pixel block: 16 latent channels cannot each take a principal component.
    with pytest.raises(ValueError, match=r"latent_channels 16 is more than the 12 values of a pixel block "
                                         r"\(3 x temporal_factor 1 x spatial_factor 2\^2\).*at most 12 latent"):
        VideoVAEModule(spatial_factor=2, temporal_factor=1, latent_channels=16, width=16, depth=1)


def test_a_width_below_latent_channels_is_refused_for_training_naming_the_smallest_width():
    """Training begins from the linear start, which needs an inner channel per latent channel: refused when
    the training module is built, before any data is written or any step runs, in one line. A VAE only used
    as a codec (loaded from its file) needs no linear start."""
    with pytest.raises(ValueError) as refused:
        VideoVAEModule(spatial_factor=4, temporal_factor=4, latent_channels=48, width=32)
    message = str(refused.value)
    assert message.startswith("width 32 is less than latent_channels 48") and "use width >= 48" in message
    assert "\n" not in message
    assert VideoVAEModule(spatial_factor=4, temporal_factor=4, latent_channels=48, width=48).vae.width == 48
    assert VideoVAE(spatial_factor=4, temporal_factor=4, latent_channels=48, width=32).width == 32


def video_batches(count: int = 4, batch: int = 4):
    videos = smooth_video(count * batch, 5, 8, 8, seed=3)
    samples = [{"video": video, "caption": "a red circle moves left"} for video in videos]
    return DataLoader(samples, batch_size=batch)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        self.losses.append(outputs["loss"].item())


def fit(module: VideoVAEModule, root: Path, steps: int, recorder: L.Callback | None = None) -> Path:
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                        callbacks=[c for c in (recorder, L.pytorch.callbacks.ModelCheckpoint(root, save_last=True))
                                   if c is not None])
    trainer.fit(module, train_dataloaders=video_batches(), val_dataloaders=video_batches(count=1))
    return root / "last.ckpt"


def test_trains_a_few_steps_and_tracks_the_latent_normalisation(tmp_path):
    module = VideoVAEModule(**TINY, learning_rate=3e-3, warmup_steps=1, statistics_momentum=0.5)
    recorder = LossRecorder()
    fit(module, tmp_path, steps=12, recorder=recorder)
    assert bool(module.started)
    assert sum(recorder.losses[-3:]) < sum(recorder.losses[:3])
    assert not torch.equal(module.vae.latents_std, torch.ones(4))
    latents = module.vae.encode(next(iter(video_batches()))["video"])
    assert latents.mean(dim=(0, 1, 2, 3)).abs().max() < 0.5
    assert 0.5 < latents.std(dim=(0, 1, 2, 3)).mean() < 2.0


def test_a_training_checkpoint_is_a_codec(tmp_path):
    module = VideoVAEModule(**TINY)
    checkpoint = fit(module, tmp_path, steps=2)
    codec = VideoVAE.from_checkpoint(checkpoint)
    video = smooth_video(2, 5, 8, 8)
    assert torch.equal(codec.encode(video), module.vae.encode(video))
    assert codec.identity() == module.vae.identity()
    assert codec.normalisation() == module.vae.normalisation()
    by_name = CODECS.get("video_vae")(**TINY, checkpoint=str(checkpoint))
    assert by_name.identity() == codec.identity()


def test_save_writes_what_from_checkpoint_reads(tmp_path):
    vae = tiny_vae()
    vae.set_normalisation(torch.arange(4.0), torch.full((4,), 2.0))
    vae.save(tmp_path / "vae.pt")
    loaded = VideoVAE.from_checkpoint(tmp_path / "vae.pt")
    assert loaded.identity() == vae.identity() and loaded.normalisation() == vae.normalisation()


def test_the_weights_are_part_of_the_identity():
    assert tiny_vae(seed=0).identity() != tiny_vae(seed=1).identity()


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.ckpt"):
        VideoVAE(checkpoint=str(tmp_path / "vae.ckpt"))


def test_a_folder_given_as_the_checkpoint_is_named_as_such_with_the_file_to_give(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    tiny_vae().save(tmp_path / "run" / "checkpoints" / "vae.ckpt")
    newest = tmp_path / "run" / "checkpoints" / "vae.ckpt"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'run'} is a folder, not a checkpoint file: give the "
                                                f"checkpoint file, such as {newest}"):
        VideoVAE.from_checkpoint(tmp_path / "run")


def test_a_damaged_checkpoint_names_the_file_and_how_to_make_another(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r".*vae.ckpt is not a VideoVAE checkpoint \(truncated.*EOFError.*flowvid fit"):
        VideoVAE(checkpoint=str(tmp_path / "vae.ckpt"))


def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(tmp_path):
    vae = tiny_vae()
    name, weight = next(iter(vae.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    vae.save(tmp_path / "vae.pt")
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'vae.pt'} is damaged: {re.escape(name)} holds NaN"):
        VideoVAE.from_checkpoint(tmp_path / "vae.pt")


def test_a_checkpoint_lacking_a_weight_is_one_line_naming_the_file_and_the_weight(tmp_path):
    """torch's strict loading would list every key over several lines, without the file or what to do."""
    tiny_vae().save(tmp_path / "vae.pt")
    checkpoint = torch.load(tmp_path / "vae.pt")
    del checkpoint["state_dict"]["vae.decoder.0.weight"]
    torch.save(checkpoint, tmp_path / "vae.pt")
    with pytest.raises(ValueError) as refused:
        VideoVAE.from_checkpoint(tmp_path / "vae.pt")
    message = str(refused.value)
    assert message.startswith(f"checkpoint {tmp_path / 'vae.pt'} does not hold the weights of the VideoVAE it "
                              "describes (missing: decoder.0.weight); train the VideoVAE again")
    assert "\n" not in message


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    tiny_vae().save(tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="from_checkpoint") as refused:
        VideoVAE(**{**TINY, "latent_channels": 8}, checkpoint=str(tmp_path / "vae.pt"))
    # The arguments it names, as the data tools' --codec-args take them, build the checkpoint's VAE.
    arguments = json.loads(str(refused.value).split("--codec-args '")[1].split("'")[0])
    assert VideoVAE(**arguments).identity() == VideoVAE.from_checkpoint(tmp_path / "vae.pt").identity()
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a VideoVAE checkpoint"):
        VideoVAE.from_checkpoint(tmp_path / "other.ckpt")


def test_a_flow_model_checkpoint_is_named_as_such(tmp_path):
    torch.save({"state_dict": {"flow.deep.proj.weight": torch.zeros(2)}, "flowvid_run": {}}, tmp_path / "flow.ckpt")
    with pytest.raises(ValueError, match=r"flow.ckpt is not a VideoVAE checkpoint \(it is the checkpoint of a flow "
                                         r"model, a video generator, not of a VideoVAE\)"):
        VideoVAE.from_checkpoint(tmp_path / "flow.ckpt")


def test_the_recipe_trains_on_the_synthetic_data_module(tmp_path, monkeypatch):
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    overrides = {
        "trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.logger": "false",
        "trainer.enable_progress_bar": "false", "trainer.default_root_dir": str(tmp_path / "run"),
        "data.init_args.root": str(tmp_path / "data"), "data.init_args.num_videos": 8,
        "data.init_args.val_videos": 4, "data.init_args.size": 16, "data.init_args.frames": 5,
        "data.init_args.shard_samples": 4, "data.init_args.batch_size": 4, "data.init_args.val_batches": 1,
        "model.init_args.latent_channels": 8, "model.init_args.width": 16, "model.init_args.depth": 1,
    }
    args = ["--config", str(RECIPE)] + [f"--{key}={value}" for key, value in overrides.items()]
    monkeypatch.setattr(sys, "argv", ["flowvid"])  # not pytest's arguments
    cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args, save_config_kwargs={"overwrite": True})
    assert isinstance(cli.model, VideoVAEModule) and cli.model.vae.spatial_factor == 4
    cli.trainer.fit(cli.model, cli.datamodule)
    assert "val/psnr" in cli.trainer.callback_metrics
    codec = VideoVAE.from_checkpoint(next((tmp_path / "run").rglob("last.ckpt")))
    assert codec.latent_shape(5, 16, 16) == (2, 4, 4, 8)


@pytest.mark.parametrize("argument", [dict(width=8.0), dict(latent_channels="4"), dict(depth=-1)])
def test_sizes_that_are_not_integers_in_range_are_refused(argument):
    with pytest.raises(ValueError, match=f"{next(iter(argument))} must be an integer"):
        VideoVAE(**{**TINY, **argument})
