"""An export or checkpoint whose frozen codec or text encoder loads from a folder: the folder must still hold
the model it was trained with."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from test_codecs_wan_vae import save_tiny_wan  # noqa: E402
from test_text_plugins import save_tiny_t5  # noqa: E402
from transformers import T5EncoderModel  # noqa: E402

from flowvid.codecs.base import CodecMismatchError  # noqa: E402
from flowvid.export import build_module, export_checkpoint, load_exported  # noqa: E402
from flowvid.lit.checkpointing import METADATA_KEY, CheckpointMismatchError, run_metadata  # noqa: E402
from flowvid.loading import load_model  # noqa: E402


def config(wan: str, t5: str) -> dict:
    return {"model": {"class_path": "flowvid.lit.FlowModule", "init_args": {
        "flow": {"class_path": "flowvid.flows.global_local.GlobalLocalFlow",
                 "init_args": {"latent_channels": 4, "frame_size": [2, 2], "num_shallow": 1, "shallow_width": 16,
                               "shallow_depth": 1, "deep_width": 32, "deep_depth": 1, "head_dim": 16,
                               "text_width": 32}},
        "codec": {"class_path": "flowvid_plugins.wan_vae.WanVAECodec", "init_args": {"path": wan}},
        "text_encoder": {"class_path": "flowvid_plugins.text_encoders.T5TextEncoder",
                         "init_args": {"path": t5, "max_length": 8}},
        "video_shape": [5, 16, 16]}}}


@pytest.fixture
def trained(tmp_path):
    """A checkpoint and its export of a model on a Wan VAE and a T5 encoder loaded from folders."""
    wan, t5 = save_tiny_wan(tmp_path / "wan"), save_tiny_t5(tmp_path / "t5")
    run_config = config(wan, t5)
    module = build_module(run_config)
    ckpt = tmp_path / "step=1.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 1,
                METADATA_KEY: run_metadata(module, config=run_config)}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "export" / "model.safetensors", weights="trained")
    return module, ckpt, out, tmp_path


def nll(module) -> torch.Tensor:
    z = torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return module.flow.nll(z, module.text_encoder.encode(["a red circle", ""]))


def perturbed(model_class, folder) -> None:
    """Write another checkpoint of the same architecture into ``folder`` (a fine-tune, another release)."""
    model = model_class.from_pretrained(folder)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    model.save_pretrained(folder)


def test_an_export_and_its_checkpoint_load_to_the_identical_likelihood(trained):
    module, ckpt, out, _ = trained
    assert torch.equal(nll(load_exported(out).module), nll(module))
    assert torch.equal(nll(load_model(ckpt)), nll(module))


def test_another_vae_in_the_codec_folder_is_refused(trained):
    _, ckpt, out, folder = trained
    perturbed(AutoencoderKLWan, folder / "wan")
    for path, where in ((out, "exported model"), (ckpt, "checkpoint")):
        with pytest.raises(CodecMismatchError, match=re.escape(f"{where} {path} was made with codec 'wan2.2'")
                           + ".*they differ in weights_sha256"):
            load_model(path)


def test_another_text_encoder_in_its_folder_is_refused(trained):
    _, ckpt, out, folder = trained
    perturbed(T5EncoderModel, folder / "t5")
    for path, where in ((out, "exported model"), (ckpt, "checkpoint")):
        with pytest.raises(CheckpointMismatchError, match=re.escape(f"{where} {path} was made with text encoder 't5'")
                           + ".*differs in weights_sha256") as error:
            load_model(path)
        assert "\n" not in str(error.value)
