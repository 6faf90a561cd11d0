"""What validation logs: bits/dim over every sample once, under the EMA, on one process or several."""

import math
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.data import write_synthetic_dataset
from flowvid.denoise import CausalDenoiser
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.checkpointing import METADATA_KEY
from flowvid.lit.module import validation_noise
from flowvid.lit.cli_support import main as cli_main
from flowvid.text import LearnedTextEncoder
from processes import run_in_gloo_group

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"
LATENTS = torch.randn(5, 4, 4, 4, 12, generator=torch.Generator().manual_seed(1))  # (B, t, h, w, c)
CAPTIONS = [f"clip {i}" for i in range(len(LATENTS))]
# Five clips in batches of three and two: on one process, or one batch on each of two.
BATCHES = [[0, 1, 2], [3, 4]]


def tiny_module(**overrides) -> FlowModule:
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(4, 4), text_width=16)
    return FlowModule(flow, PixelCodec(patch_size=2), LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8),
                      CausalDenoiser(12, (4, 4), width=16, depth=1, head_dim=8, text_width=16),
                      video_shape=(4, 8, 8), warmup_steps=1, schedule_steps=100, **overrides)


def trainer(**overrides) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        **overrides})


def batch(indices: list[int]) -> dict:
    return {"latents": LATENTS[indices], "caption": [CAPTIONS[i] for i in indices], "key": [str(i) for i in indices]}


def bits_per_dim_of_each_clip(module: FlowModule, clips: list[int]) -> torch.Tensor:
    """``flow.bits_per_dim`` of each clip, one at a time, with the noise its key draws."""
    values = []
    with torch.no_grad():
        for i in clips:
            clean = LATENTS[[i]]
            noise = validation_noise([str(i)], clean.shape, batch_idx=0)
            values.append(module.flow.bits_per_dim(clean + module.noise_std * noise, module.encode_text([CAPTIONS[i]])))
    return torch.cat(values)


def test_a_clips_validation_noise_follows_its_key_not_its_batch():
    shape = (3, 2, 4)
    alone = {key: validation_noise([key], (1, *shape), batch_idx=7)[0] for key in "abc"}
    together = validation_noise(["c", "a", "b"], (3, *shape), batch_idx=0)
    assert all(torch.equal(together[row], alone[key]) for row, key in enumerate("cab"))
    assert not torch.equal(alone["a"], alone["b"])


def test_bits_per_dim_average_every_clip_once_under_the_ema_and_the_trained_weights_come_back():
    module = tiny_module(ema_decay=0.5)
    trainer(max_steps=2, limit_val_batches=0).fit(module, DataLoader([batch([0, 1])] * 2, batch_size=None))
    trained = {name: weight.clone() for name, weight in module.state_dict().items()}
    logged = trainer().validate(module, DataLoader([batch(b) for b in BATCHES], batch_size=None), verbose=False)[0]

    assert all(torch.equal(trained[name], weight) for name, weight in module.state_dict().items())
    with module.averaged_weights():
        averaged = bits_per_dim_of_each_clip(module, list(range(len(LATENTS))))
    # Each clip once, not the mean of the two batches' means.
    assert logged["val/bits_per_dim"] == pytest.approx(averaged.mean().item(), rel=1e-6)
    assert logged["val/nats_per_dim"] == pytest.approx(averaged.mean().item() * math.log(2), rel=1e-6)
    assert bits_per_dim_of_each_clip(module, list(range(len(LATENTS)))).mean().item() != pytest.approx(
        logged["val/bits_per_dim"], rel=1e-6)  # the trained weights give another number


def validate_the_ranks_batch(rank: int, out_dir: Path) -> dict:
    run = trainer(devices=2, strategy=DDPStrategy(process_group_backend="gloo"), use_distributed_sampler=False)
    return run.validate(tiny_module(), DataLoader([batch(BATCHES[rank])], batch_size=None), verbose=False)[0]


@pytest.mark.slow
def test_two_processes_with_an_odd_number_of_clips_average_each_clip_once(tmp_path):
    """Three clips on one process and two on the other: five, not four (a count of 5 / 2 rounded down), each
    with the noise it has on one process."""
    logged = run_in_gloo_group(validate_the_ranks_batch, tmp_path)
    each_clip = bits_per_dim_of_each_clip(tiny_module(), list(range(len(LATENTS))))
    for rank in logged:
        assert rank["val/bits_per_dim"] == pytest.approx(each_clip.mean().item(), rel=1e-5)
        assert rank["val/nats_per_dim"] == pytest.approx(each_clip.mean().item() * math.log(2), rel=1e-5)


def validate(tmp_path: Path, *args: str) -> int:
    write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=8, size=16, val_videos=2)
    with mock.patch.object(sys, "argv", ["flowvid"]):  # pytest's own arguments are not the CLI's
        return cli_main(["validate", "--config", str(RECIPE), f"--trainer.default_root_dir={tmp_path / 'run'}",
                         f"--data.init_args.train_dir={tmp_path / 'shapes' / 'train'}", *args])


def test_validate_without_validation_data_is_a_one_line_error(tmp_path, capsys):
    assert validate(tmp_path, "--data.init_args.val_dir=null") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == ("flowvid validate: error: data.init_args.val_dir is not set, so there is nothing to validate; "
                         "give the validation shards with --data.init_args.val_dir")


def test_validate_refuses_a_checkpoint_of_another_model_in_one_line(tmp_path, capsys):
    other_model = tmp_path / "other_model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"noise_std": 0.5},
                METADATA_KEY: {"parameters": {"flow.deep.proj_in.weight": [64, 12]}}}, other_model)
    assert validate(tmp_path, f"--data.init_args.val_dir={tmp_path / 'shapes' / 'val'}",
                    f"--ckpt_path={other_model}") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"flowvid validate: error: checkpoint {other_model} was made by a different model "
                                "configuration")
    assert "Traceback" not in "\n".join(error)


def test_a_model_without_a_moving_average_says_it_leaves_out_the_checkpoints():
    averaging = tiny_module(ema_decay=0.5)
    checkpoint = {"state_dict": averaging.state_dict()}
    averaging.on_save_checkpoint(checkpoint)
    with pytest.warns(UserWarning, match="the checkpoint holds a moving average of the weights, which this model "
                                         r"\(ema_decay null\) leaves out"):
        tiny_module().on_load_checkpoint(checkpoint)
