"""What generate, score and the pipeline load: a flow video generator only, and its parts' folders found where
the model was made to be moved with them."""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch

import flowvid.export
from flowvid.cli import main
from flowvid.codecs.vae_training import VideoVAEModule
from flowvid.export import build_module, export_checkpoint
from flowvid.lit.checkpointing import METADATA_KEY, run_metadata
from flowvid.loading import load_model
from flowvid.pipeline import VideoPipeline

VAE_CONFIG = {"model": {"class_path": "flowvid.codecs.vae_training.VideoVAEModule", "init_args": {
    "spatial_factor": 2, "temporal_factor": 2, "latent_channels": 4, "width": 8, "depth": 1}}}


def save_checkpoint(module, run_config, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "global_step": 1,
                METADATA_KEY: run_metadata(module, config=run_config)}, path)
    return path


@pytest.fixture
def vae_run(tmp_path, monkeypatch):
    """A video VAE's checkpoint, and its export as flowvid export wrote one before it refused to."""
    module = build_module(VAE_CONFIG)
    assert isinstance(module, VideoVAEModule)
    ckpt = save_checkpoint(module, VAE_CONFIG, tmp_path / "vae" / "last.ckpt")
    with monkeypatch.context() as before_the_refusal:
        before_the_refusal.setattr(flowvid.export, "check_flow_model", lambda *args: None)
        export = export_checkpoint(ckpt, tmp_path / "exported" / "model.safetensors", weights="trained")
    return ckpt, export


def test_a_video_vae_is_refused_as_a_generator_in_one_line(vae_run, tmp_path, capsys):
    ckpt, export = vae_run
    for path in (ckpt, export, export.parent):
        with pytest.raises(ValueError, match=r"holds a flowvid\.codecs\.vae_training\.VideoVAEModule, not a flow "
                                             r"video generator; a video VAE's training checkpoint is a codec as it "
                                             r"is: .*VideoVAE\.from_checkpoint"):
            VideoPipeline.from_pretrained(path, device="cpu")
    np.save(tmp_path / "clip.npy", np.zeros((4, 8, 8, 3), np.uint8))
    for command in ("generate", "score"):
        extra = ["--input", str(tmp_path / "clip.npy")] if command == "score" else []
        assert main([command, "--ckpt", str(ckpt), *extra, "--out", str(tmp_path / "o")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"flowvid {command}: error: {ckpt} holds a flowvid.codecs.vae_training."
                                "VideoVAEModule") and "\n" not in error
        assert f'''--codec-args \'{{"checkpoint": "{ckpt}", "spatial_factor": 2,''' in error


pytest.importorskip("transformers")
from test_product_generate_score import CONFIG  # noqa: E402
from test_text_plugins import save_tiny_t5  # noqa: E402


def t5_config(t5: str) -> dict:
    """The suite's small text-to-video model, its text encoder a T5 from the folder ``t5``."""
    config = copy.deepcopy(CONFIG)
    config["trainer"] = {"default_root_dir": "runs/t5"}
    parts = config["model"]["init_args"]
    parts["flow"]["init_args"]["text_width"] = 32
    parts["text_encoder"] = {"class_path": "flowvid_plugins.text_encoders.T5TextEncoder",
                             "init_args": {"path": t5, "max_length": 8}}
    return config


@pytest.fixture
def relative_t5_run(tmp_path, monkeypatch):
    """A run started in ``project/`` whose T5 folder the recipe names by a relative path, its checkpoint under
    the run's ``runs/t5`` and its export; then the current folder is another one."""
    project = tmp_path / "project"
    save_tiny_t5(project / "t5")
    monkeypatch.chdir(project)
    run_config = t5_config("t5")
    module = build_module(run_config)
    ckpt = save_checkpoint(module, run_config, project / "runs" / "t5" / "checkpoints" / "step=1.ckpt")
    export = export_checkpoint(ckpt, project / "exported" / "model.safetensors", weights="trained")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return module, ckpt, export


def nll(module) -> torch.Tensor:
    z = torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return module.flow.nll(z, module.text_encoder.encode(["a red circle", ""]))


def test_a_checkpoint_finds_a_relative_folder_in_the_folder_its_run_was_started_in(relative_t5_run):
    module, ckpt, _ = relative_t5_run
    assert not os.path.exists("t5")
    assert torch.equal(nll(load_model(ckpt)), nll(module))
    moved = ckpt.parents[4] / "moved" / ckpt.name  # out of its run: the folder beside it is the one read
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    with pytest.raises(FileNotFoundError) as error:
        load_model(moved)
    assert str(error.value) == (
        f"cannot build the model of checkpoint {moved}: model.init_args.text_encoder.init_args.path t5 is in "
        f"neither the current folder nor {moved.parent}; copy the folder the model was made with to "
        f"{moved.parent / 't5'}, or run from the folder that holds t5")
    shutil.copytree(ckpt.parents[3] / "t5", moved.parent / "t5")
    assert torch.equal(nll(load_model(moved)), nll(module))


def test_an_export_finds_a_relative_folder_beside_it_and_names_it_in_one_line_when_missing(relative_t5_run, capsys):
    module, ckpt, export = relative_t5_run
    with pytest.raises(FileNotFoundError, match=r"^cannot build the model of .*: model.init_args.text_encoder."
                                                r"init_args.path t5 is in neither the current folder nor "
                                                + str(export.parent)) as error:
        load_model(export)
    assert "\n" not in str(error.value) and "plugin" not in str(error.value)
    assert main(["generate", "--ckpt", str(export), "--prompt", "a red circle", "--out", "o"]) == 2
    assert f"copy the folder the model was made with to {export.parent / 't5'}" in capsys.readouterr().err
    shutil.copytree(ckpt.parents[3] / "t5", export.parent / "t5")
    assert torch.equal(nll(VideoPipeline.from_pretrained(export, device="cpu").model), nll(module))
