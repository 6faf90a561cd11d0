"""flowvid export: checkpoint -> safetensors + config.yaml -> the same model, with no pickle on load."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from flowvid.cli import UserError
from flowvid.export import build_module, export_checkpoint, load_exported, main, read_export_metadata
from flowvid.lit.checkpointing import METADATA_KEY, CorruptCheckpointError, run_metadata

CONFIG = {
    "model": {
        "class_path": "flowvid.lit.FlowModule",
        "init_args": {
            "flow": {"class_path": "flowvid.flows.global_local.GlobalLocalFlow",
                     "init_args": {"latent_channels": 3, "frame_size": [4, 4], "num_shallow": 2, "shallow_width": 32,
                                   "shallow_depth": 1, "deep_width": 32, "deep_depth": 1, "head_dim": 16}},
            "codec": {"class_path": "flowvid.codecs.pixel.PixelCodec"},
            "denoiser": {"class_path": "flowvid.denoise.CausalDenoiser",
                         "init_args": {"channels": 3, "frame_size": [4, 4], "width": 16, "depth": 1, "head_dim": 16}},
            "video_shape": [2, 4, 4],
        },
    },
}
BATCH = torch.rand(3, 2, 4, 4, 3, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def trained(tmp_path):
    """A Lightning checkpoint of a model whose weights are not the initial ones, with an EMA."""
    module = build_module(CONFIG)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ema = {name: p.detach() + 0.01 for name, p in module.named_parameters() if name.startswith("flow.")}
    checkpoint = {"state_dict": module.state_dict(), "global_step": 7, "flowvid": {"ema": ema},
                  METADATA_KEY: run_metadata(module, config=CONFIG)}
    path = tmp_path / "step=00000007.ckpt"
    torch.save(checkpoint, path)
    return module, path


def nll(model) -> torch.Tensor:
    with torch.no_grad():
        return model.flow.nll(BATCH)


def test_export_then_load_gives_the_identical_log_likelihood(trained, tmp_path):
    module, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "export" / "model.safetensors", weights="trained")
    loaded = load_exported(out)
    assert torch.equal(nll(loaded), nll(module))
    assert loaded.denoiser is not None and loaded.codec.identity() == module.codec.identity()
    assert yaml.safe_load((tmp_path / "export" / "config.yaml").read_text()) == CONFIG
    metadata = read_export_metadata(out)
    assert metadata["codec"] == module.codec.identity() and metadata["weights"] == "trained"
    assert metadata["global_step"] == "7"


def test_the_moving_average_is_exported_by_default(trained, tmp_path):
    module, ckpt = trained
    loaded = load_exported(export_checkpoint(ckpt, tmp_path / "model.safetensors"))
    assert torch.equal(loaded.flow.deep.proj_in.weight, module.flow.deep.proj_in.weight + 0.01)
    assert torch.equal(loaded.denoiser.proj_in.weight, module.denoiser.proj_in.weight)  # no EMA kept for it


def test_an_export_of_the_moving_average_is_not_loaded_as_the_trained_weights(trained, tmp_path):
    from flowvid.loading import load_model

    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    assert torch.equal(load_model(out).flow.deep.sos, load_exported(out).flow.deep.sos)
    with pytest.raises(ValueError, match="holds the moving average .* `flowvid export --weights trained`"):
        load_model(out, weights="trained")


def test_bf16_export_halves_the_file_and_loads_as_fp32_close_to_the_original(trained, tmp_path):
    module, ckpt = trained
    full = export_checkpoint(ckpt, tmp_path / "fp32" / "model.safetensors", weights="trained")
    half = export_checkpoint(ckpt, tmp_path / "bf16" / "model.safetensors", dtype="bf16", weights="trained")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_exported(half)
    assert loaded.flow.deep.proj_in.weight.dtype == torch.float32
    assert torch.allclose(nll(loaded), nll(module), rtol=2e-2)


def test_an_existing_export_is_not_overwritten_without_force(trained, tmp_path):
    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "model.safetensors", weights="trained")
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="pass --force"):
        export_checkpoint(ckpt, out)
    with pytest.raises(UserError, match="exists"):
        main(["--ckpt", str(ckpt), "--out", str(out)])
    assert out.read_bytes() == before
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != before  # now the EMA weights


def test_a_corrupt_checkpoint_or_a_mismatched_config_is_a_clear_error(trained, tmp_path):
    _, ckpt = trained
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        main(["--ckpt", str(broken), "--out", str(tmp_path / "x.safetensors")])
    out = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    wider = yaml.safe_load((tmp_path / "config.yaml").read_text())
    wider["model"]["init_args"]["flow"]["init_args"]["deep_width"] = 64
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    with pytest.raises(ValueError, match="different shape: flow.deep"):
        load_exported(out, config=tmp_path / "wider.yaml")
    with pytest.raises(CorruptCheckpointError):
        export_checkpoint(broken, tmp_path / "other" / "y.safetensors")


def test_an_export_given_as_the_checkpoint_is_named_as_an_export(trained, tmp_path):
    from flowvid.cli import UserError

    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "exported" / "model.safetensors")
    for given, what in ((out.parent, f"an export ({out})"), (out, "an export")):
        for adapters in ([], ["--adapters-only"]):
            with pytest.raises(UserError) as refused:
                main(["--ckpt", str(given), "--out", str(tmp_path / "again" / "model.safetensors"), *adapters])
            assert str(refused.value).startswith(f"{given} is {what}, not a training checkpoint: export from the "
                                                 "run's checkpoint")
    assert not (tmp_path / "again").exists()


def test_a_config_that_is_not_the_one_exported_with_the_weights_is_named(trained, tmp_path, recwarn):
    """An export interrupted between its weights and its config, or another export into the same folder,
    leaves a pair that may still load: the checksum of the config in the weights' metadata tells."""
    module, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    load_exported(out)
    assert not [w for w in recwarn if "exported with" in str(w.message)]
    other = yaml.safe_load((tmp_path / "config.yaml").read_text())
    other["model"]["init_args"]["lr"] = 7.5e-4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'config.yaml'} is not the config model.safetensors "
                                                   "was exported with")):
        assert load_exported(out).module.hparams.lr == 7.5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_exported(out, config=tmp_path / "config.yaml")  # a config given on purpose is not second-guessed


def test_a_broken_or_misplaced_config_is_an_error_naming_the_file(trained, tmp_path):
    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "export" / "model.safetensors")
    (tmp_path / "export" / "config.yaml").write_text("model: {class_path: [unclosed\n")
    with pytest.raises(ValueError, match=re.escape(f"config {tmp_path / 'export' / 'config.yaml'} is not valid YAML")) as bad:
        load_exported(out)
    assert "\n" not in str(bad.value) and "line 2, column 1" in str(bad.value)  # the parser's own spans four lines
    with pytest.raises(ValueError, match=re.escape(f"config {tmp_path} is not a file")):
        load_exported(out, config=tmp_path)


def test_an_output_that_cannot_be_an_export_is_refused_before_the_checkpoint_is_read(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    missing = tmp_path / "nope.ckpt"  # the --out error comes first
    refusals = {
        # written, but generate and score then read it as a Lightning checkpoint: "not a PyTorch checkpoint"
        "model.pt": f"--out {tmp_path / 'model.pt'} does not end in .safetensors",
        "notes.txt/model.safetensors": f"--out {tmp_path / 'notes.txt' / 'model.safetensors'} is inside the file",
    }
    for out, message in refusals.items():
        with pytest.raises(UserError, match=re.escape(message)):
            main(["--ckpt", str(missing), "--out", str(tmp_path / out), "--force"])
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_export_that_cannot_be_written_is_one_line(trained, tmp_path, monkeypatch):
    _, ckpt = trained

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flowvid.export.save_file", full_disk)
    with pytest.raises(UserError, match=re.escape(f"cannot write the export {tmp_path / 'model.safetensors'}: "
                                                  "No space left on device")):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "model.safetensors")])
    assert not list(tmp_path.glob("model.safetensors*"))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_permissions_of_any_new_file(trained, tmp_path, umask):
    _, ckpt = trained
    previous = os.umask(umask)
    try:
        out = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    for path in (out, tmp_path / "config.yaml"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_a_damaged_export_is_a_corrupt_checkpoint_error_naming_the_file(trained, tmp_path):
    _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    junk, truncated = tmp_path / "junk.safetensors", tmp_path / "truncated.safetensors"
    junk.write_bytes(b"not a tensor file" * 10)
    truncated.write_bytes(out.read_bytes()[:-64])
    for damaged in (junk, truncated):
        with pytest.raises(CorruptCheckpointError, match=re.escape(f"cannot read exported model {damaged}")):
            load_exported(damaged)
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(damaged))):
            read_export_metadata(damaged)


def test_weights_that_hold_nan_are_named_not_exported_or_loaded(trained, tmp_path):
    from flowvid.loading import load_model

    module, _ = trained
    state = module.state_dict()
    state["flow.deep.proj_in.weight"][0, 0] = float("nan")
    damaged = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": state, "global_step": 7, METADATA_KEY: run_metadata(module, config=CONFIG)}, damaged)
    message = f"the weights in {damaged} are damaged: flow.deep.proj_in.weight holds NaN or infinite values"
    with pytest.raises(ValueError, match=re.escape(message)):
        export_checkpoint(damaged, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(damaged)


def test_a_model_that_kept_an_average_samples_with_the_loaded_weights(tmp_path):
    """Loading builds a fresh module (with a fresh EMA): sampling must use the loaded weights, not the init."""
    from flowvid.loading import load_model

    config = {"model": {**CONFIG["model"], "init_args": {**CONFIG["model"]["init_args"], "ema_decay": 0.9}}}
    module = build_module(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 3, "flowvid": {"ema": {}},
                METADATA_KEY: run_metadata(module, config=config)}, path)
    for loaded in (load_model(path), load_exported(export_checkpoint(path, tmp_path / "model.safetensors")).module):
        with loaded.averaged_weights():
            assert torch.equal(nll(loaded), nll(module))
        torch.testing.assert_close(loaded.generate_videos(["", ""], seed=0), module.generate_videos(["", ""], seed=0),
                                   rtol=0, atol=1)


def test_a_run_directory_or_an_export_folder_names_its_newest_model(trained, tmp_path):
    from flowvid.loading import load_model

    module, ckpt = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    older = build_module(CONFIG)
    torch.save({"state_dict": older.state_dict(), "global_step": 3, METADATA_KEY: run_metadata(older, config=CONFIG)},
               run / "checkpoints" / "step=00000003.ckpt")
    (run / "checkpoints" / "step=00000007.ckpt").write_bytes(ckpt.read_bytes())
    (run / "checkpoints" / "step=00000009.ckpt").write_bytes(ckpt.read_bytes()[:500])  # a torn newest one
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        loaded = load_model(run, weights="trained")
    assert torch.equal(nll(loaded), nll(module))
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        out = export_checkpoint(run / "checkpoints", tmp_path / "export" / "model.safetensors", weights="trained")
    assert read_export_metadata(out)["source"] == "step=00000007.ckpt" and read_export_metadata(out)["global_step"] == "7"
    assert torch.equal(nll(load_model(tmp_path / "export")), nll(module))  # the folder of an export

    (tmp_path / "export" / "copy.safetensors").write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match="2 .safetensors files"):
        load_model(tmp_path / "export")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory without a checkpoint"):
        load_model(tmp_path / "empty")
    (run / "checkpoints" / "step=00000003.ckpt").unlink()
    (run / "checkpoints" / "step=00000007.ckpt").write_bytes(b"torn")
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="none can be read"):
        load_model(run)


def test_the_model_card_says_what_the_export_holds_and_never_replaces_a_readme_of_yours(trained, tmp_path, capsys):
    from flowvid.model_card import CARD_MARK

    module, ckpt = trained
    out = tmp_path / "export" / "model.safetensors"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--weights", "trained"]) == 0
    assert "and " + str(out.parent / "README.md") in capsys.readouterr().out
    card = (out.parent / "README.md").read_text()
    flow, denoiser = (sum(p.numel() for p in part.parameters()) for part in (module.flow, module.denoiser))
    assert card.startswith(CARD_MARK) and "| training steps | 7 |" in card and "| video | 2 frames of 4x4 pixels |" in card
    assert f"flow {flow:,}, denoiser {denoiser:,}" in card and "`pixel`" in card and "none: an unconditional" in card
    assert f'VideoPipeline.from_pretrained("{out.parent.name}")' in card and str(tmp_path) not in card

    mine = tmp_path / "mine" / "README.md"
    mine.parent.mkdir()
    mine.write_text("# my project\n")
    assert main(["--ckpt", str(ckpt), "--out", str(mine.parent / "model.safetensors")]) == 0
    assert mine.read_text() == "# my project\n" and "README" not in capsys.readouterr().out
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0  # a card of ours is written again
    assert (out.parent / "README.md").read_text().startswith(CARD_MARK)


def test_an_export_or_checkpoint_holds_its_video_vae_and_loads_without_the_vae_file(tmp_path):
    from flowvid.codecs import VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE(spatial_factor=2, temporal_factor=1, latent_channels=3, width=8, depth=1)
    with torch.no_grad():
        vae.latents_std.fill_(2.0)  # trained normalisation, which the weights file carries
    vae.save(tmp_path / "vae.pt")
    config = {"model": {**CONFIG["model"], "init_args": {
        **CONFIG["model"]["init_args"], "video_shape": [2, 8, 8],
        "codec": {"class_path": "flowvid.codecs.VideoVAE", "init_args": {
            "spatial_factor": 2, "temporal_factor": 1, "latent_channels": 3, "width": 8, "depth": 1,
            "checkpoint": str(tmp_path / "vae.pt")}}}}}
    module = build_module(config)
    path = tmp_path / "step=00000001.ckpt"
    torch.save({"state_dict": module.state_dict(), METADATA_KEY: run_metadata(module, config=config)}, path)
    out = export_checkpoint(path, tmp_path / "export" / "model.safetensors", weights="trained")
    (tmp_path / "vae.pt").unlink()  # the export is shared without the training machine's files

    from flowvid.loading import load_model

    video = torch.randint(0, 256, (1, 2, 8, 8, 3), dtype=torch.uint8)
    for loaded in (load_exported(out).module, load_model(path)):  # the training checkpoint holds them too
        assert loaded.codec.identity() == module.codec.identity()
        assert torch.equal(loaded.codec.encode(video), module.codec.encode(video))


def test_adapters_merged_into_bf16_weights_keep_their_whole_update_in_an_fp32_export(tmp_path):
    """DeepSpeed keeps the frozen weights of a LoRA run in bf16: a merge rounded back to bf16 lost most of
    an update smaller than half a bf16 step of the weight."""
    from flowvid.nn.lora import add_lora

    torch.manual_seed(0)
    module = build_module(CONFIG)
    add_lora(module.flow, rank=4)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0, 1e-3)
    module = module.to(torch.bfloat16)
    state = module.state_dict()
    path = tmp_path / "step=00000007.ckpt"
    torch.save({"state_dict": state, "global_step": 7, METADATA_KEY: run_metadata(module, config=CONFIG)}, path)
    loaded = load_exported(export_checkpoint(path, tmp_path / "model.safetensors", weights="trained"))
    layer = "flow.deep.layers.0.attn.qkv."
    update = state[layer + "lora_scale"].float() * (state[layer + "lora_b"].float() @ state[layer + "lora_a"].float())
    merged = loaded.module.state_dict()[layer + "weight"]
    assert merged.dtype == torch.float32 and (merged - state[layer + "weight"].float()).abs().max() > 0
    torch.testing.assert_close(merged, state[layer + "weight"].float() + update, rtol=0, atol=1e-7)


def test_each_exported_file_is_on_disk_before_its_rename_and_the_rename_after_it(trained, tmp_path, monkeypatch):
    """A power cut, unlike a crash, loses what is not flushed: without the file's bytes on disk before the
    rename, the export's name could point at an empty file after one."""
    import stat

    _, ckpt = trained
    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *paths: (events.append(f"rename {paths[1].name}"), replace(*paths))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "file"), fsync(fd))[1])
    export_checkpoint(ckpt, tmp_path / "model.safetensors")
    assert events == [event for name in ("model.safetensors", "config.yaml", "README.md")
                      for event in ("file", f"rename {name}", "folder")]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_truncated_deepspeed_shard_is_one_line_naming_it(tmp_path):
    """torch's RuntimeError for the shard names no file and ended the command in a traceback. DeepSpeed
    reads the shards in a process of its own, as the command runs."""
    ckpt = tmp_path / "step=00000001.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    torch.save({METADATA_KEY: {"world_size": 1}, "module": {"w": torch.zeros(0)}, "buffer_names": [],
                "param_shapes": [{"w": torch.Size([4])}], "shared_params": {}},
               ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    shard = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2}}, shard)
    shard.write_bytes(shard.read_bytes()[:300])  # a copy that stopped part way
    done = subprocess.run([sys.executable, "-m", "flowvid.cli", "export", "--ckpt", str(ckpt),
                           "--out", str(tmp_path / "export" / "model.safetensors")],
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot read DeepSpeed checkpoint {ckpt}: {shard} is truncated or damaged" in done.stderr
    assert not (tmp_path / "export" / "model.safetensors").exists()
