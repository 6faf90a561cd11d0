"""The Wan VAE codec plugin on a tiny randomly initialised AutoencoderKLWan saved to a temporary folder."""

import json
import re
import shutil
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

from flowvid.codecs import LatentCodec  # noqa: E402
from flowvid.registry import CODECS  # noqa: E402
from flowvid.testing.codec_conformance import CodecConformance, smooth_video  # noqa: E402
from flowvid_plugins.wan_vae import WAN22_LATENTS_MEAN, WanVAECodec, normalisation_tables  # noqa: E402

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 1.5]


def save_tiny_wan(folder, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4):
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=list(latents_mean),
                     latents_std=list(latents_std)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan"), MEAN, STD)


class TestWanVAECodec(CodecConformance):
    video_shape = (5, 16, 16)

    @pytest.fixture(autouse=True)
    def _folder(self, wan_dir):
        self.folder = wan_dir

    def make_codec(self):
        return WanVAECodec(self.folder)


def test_found_by_entry_point():
    assert "wan2.2" in {ep.name for ep in entry_points(group="flowvid.codecs")}
    assert CODECS.get("wan2.2") is WanVAECodec


def test_factors_and_channels_come_from_the_model(wan_dir):
    codec = WanVAECodec(wan_dir)
    assert (codec.spatial_factor, codec.temporal_factor, codec.latent_channels) == (8, 4, 4)
    assert codec.latent_shape(9, 32, 16) == (3, 4, 2, 4)
    assert codec.name == "wan2.2"


def test_latents_are_normalised_and_later_frames_scaled(wan_dir):
    codec = WanVAECodec(wan_dir)
    unscaled = WanVAECodec(wan_dir, temporal_scale=1.0)
    video = smooth_video(1, 9, 16, 16)
    raw = codec.vae.encode(video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1).latent_dist.mode()
    expected = (raw.permute(0, 2, 3, 4, 1) - torch.tensor(MEAN)) / torch.tensor(STD)
    latents = codec.encode(video)
    torch.testing.assert_close(unscaled.encode(video), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents[:, :1], expected[:, :1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents[:, 1:], 0.6 * expected[:, 1:], rtol=1e-4, atol=1e-5)
    # decoding undoes the scale and the normalisation: both codecs give the same video
    assert (codec.decode(latents).int() - unscaled.decode(expected).int()).abs().max() <= 1


def test_normalisation_tables_from_config_else_wan22():
    assert normalisation_tables(SimpleNamespace(z_dim=2, latents_mean=[1, 2], latents_std=[3, 4])) == ([1, 2], [3, 4])
    mean, std = normalisation_tables(SimpleNamespace(z_dim=48, latents_mean=[0.0] * 16, latents_std=[1.0] * 16))
    assert mean == list(WAN22_LATENTS_MEAN) and len(std) == 48 and min(std) > 0.3
    with pytest.raises(ValueError, match="z_dim=8"):
        normalisation_tables(SimpleNamespace(z_dim=8, latents_mean=[0.0] * 16, latents_std=[1.0] * 16))


def test_wan22_tables_replacing_a_config_files_own_are_warned_of_once_naming_the_file_and_lengths(tmp_path):
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=16, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
                     latents_std=[1.0] * 12).save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as caught:
        codec = WanVAECodec(str(tmp_path))
    assert [str(warning.message) for warning in caught] == [
        f"{tmp_path / 'config.json'} has z_dim 48 but latents_mean of 16 and latents_std of 12 values: normalising "
        "with Wan2.2 TI2V-5B's 48-value tables instead; give tables of 48 values there to use the model's own"]
    assert caught[0].filename == __file__
    assert codec.latents_mean.tolist() == pytest.approx(WAN22_LATENTS_MEAN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WanVAECodec(str(tmp_path))  # the same file again: warned of already
        # A config without tables of its own means Wan2.2's: nothing to warn of.
        config = tmp_path / "config.json"
        settings = json.loads(config.read_text())
        del settings["latents_mean"], settings["latents_std"]
        config.write_text(json.dumps(settings))
        other = tmp_path / "copy"
        shutil.copytree(tmp_path, other, ignore=shutil.ignore_patterns("copy"))
        normalisation_tables(SimpleNamespace(z_dim=48, latents_mean=[0.0] * 16, latents_std=[1.0] * 16),
                             other / "config.json")


def test_identity_follows_the_model_config_and_scale_not_the_folder(wan_dir, tmp_path):
    copy = save_tiny_wan(tmp_path / "copy", MEAN, STD)
    assert WanVAECodec(copy).identity() == WanVAECodec(wan_dir).identity()
    assert WanVAECodec(wan_dir, temporal_scale=1.0).identity() != WanVAECodec(wan_dir).identity()
    # Another VAE of the same config (fine-tuned, distilled) gives other latents: another identity.
    tuned = AutoencoderKLWan.from_pretrained(copy)
    with torch.no_grad():
        next(tuned.parameters()).add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    assert WanVAECodec(str(tmp_path / "tuned")).identity() != WanVAECodec(wan_dir).identity()


def test_missing_folder_names_the_path_and_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as error:
        WanVAECodec(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value) and "diffusion_pytorch_model.safetensors" in str(error.value)


def test_frozen_weights_stay_out_of_checkpoints(wan_dir):
    holder = nn.Module()
    holder.codec = WanVAECodec(wan_dir)
    holder.head = nn.Linear(2, 2)
    state = holder.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    holder.load_state_dict(state)  # strict: the frozen weights count as present
    assert not any(p.requires_grad for p in holder.codec.parameters())
    holder.train()
    assert not holder.codec.vae.training


def test_selectable_from_yaml(wan_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--codec", type=LatentCodec)
    config = parser.parse_string(f"codec:\n  class_path: WanVAECodec\n  init_args:\n    path: {wan_dir}\n")
    assert isinstance(parser.instantiate_classes(config).codec, WanVAECodec)


def test_posterior_samples_are_seeded_by_each_video_not_the_batch_or_global_state(wan_dir):
    codec = WanVAECodec(wan_dir, sample_posterior=True)
    videos = torch.randint(0, 256, (2, 5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    together = codec.encode(videos)
    torch.rand(7)  # whatever drew from the global generator in between
    alone = codec.encode(videos[1:])
    torch.testing.assert_close(together[1:], alone)
    assert not torch.allclose(together, WanVAECodec(wan_dir).encode(videos))  # a sample, not the mean


def test_weights_that_do_not_fit_the_config_are_one_line_naming_the_file(tmp_path):
    """diffusers draws a weight the file lacks at random with a logged warning, and a config that does not
    fit its weights is an error of a hundred lines."""
    from safetensors.torch import load_file, save_file

    folder = Path(save_tiny_wan(tmp_path / "wan"))
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({name: tensor for name, tensor in tensors.items() if name != "decoder.conv_out.weight"}, weights)
    with pytest.raises(ValueError, match=re.escape(f"Wan VAE weights {weights} do not hold the model config.json "
                                                   "describes (missing: decoder.conv_out.weight)")):
        WanVAECodec(str(folder))
    save_file(tensors, weights)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"base_dim": 16', '"base_dim": 8'))
    with pytest.raises(ValueError, match=re.escape(f"Wan VAE weights {weights}") + ".*other shape") as error:
        WanVAECodec(str(folder))
    assert "\n" not in str(error.value)


def test_a_damaged_file_or_a_config_of_another_model_is_one_line_naming_it(tmp_path):
    folder = Path(save_tiny_wan(tmp_path / "wan"))
    weights, config = folder / "diffusion_pytorch_model.safetensors", folder / "config.json"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"cannot read Wan VAE weights {weights}: damaged, truncated")):
        WanVAECodec(str(folder))
    config.write_text(config.read_text().replace('"AutoencoderKLWan"', '"AutoencoderKL"'))
    with pytest.raises(ValueError, match=re.escape(f"{config} describes model class AutoencoderKL, not AutoencoderKLWan")):
        WanVAECodec(str(folder))


def test_a_hub_id_is_not_downloaded_and_the_error_says_how_to_download_it_first(without_network):
    with pytest.raises(FileNotFoundError) as error:
        WanVAECodec("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    message = str(error.value)
    assert "nothing is downloaded at run time" in message and "\n" not in message
    assert "`hf download Wan-AI/Wan2.2-TI2V-5B-Diffusers --include 'vae/*' --local-dir DIR`" in message
    assert message.endswith("give the local folder DIR/vae")


def test_the_folder_of_a_whole_pipeline_points_to_its_vae_folder(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"give its VAE folder, {tmp_path / 'vae'}")):
        WanVAECodec(str(tmp_path))


def test_the_config_of_a_text_encoder_is_refused_naming_it_not_the_weights(tmp_path, wan_dir):
    """A transformers config has no _class_name; diffusers would ignore its keys with a warning of a hundred
    settings, then fail on one of them and blame the weights."""
    folder = tmp_path / "vae"
    shutil.copytree(wan_dir, folder)
    config = folder / "config.json"
    config.write_text(json.dumps({"model_type": "t5", "d_model": 32, "dtype": "float32"}))
    with pytest.raises(ValueError, match=re.escape(f"{config} describes no diffusers model (model_type 't5'), "
                                                   "not AutoencoderKLWan")):
        WanVAECodec(str(folder))


def test_a_config_without_its_class_name_still_loads_as_a_wan_vae(tmp_path, wan_dir):
    """diffusers loads a model config that leaves out _class_name; only a config that names another kind of
    model (a transformers model_type) is refused."""
    folder = tmp_path / "vae"
    shutil.copytree(wan_dir, folder)
    config = folder / "config.json"
    config.write_text(json.dumps({key: value for key, value in json.loads(config.read_text()).items()
                                  if key != "_class_name"}))
    assert WanVAECodec(str(folder)).latent_channels == 4
