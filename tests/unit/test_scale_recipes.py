"""The scale recipes parse, alone or as overlays, and say what their headers promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import SingleDeviceStrategy

from flowvid.denoise import CausalDenoiser
from flowvid.flows import GlobalLocalFlow
from flowvid.flows.presets import PRESETS
from flowvid.lit.cli_support import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
DEMO = RECIPES / "demo" / "shapes_t2v.yaml"
PAPER_SCALE = RECIPES / "starflow_v" / "t2v_480p.yaml"
OWN_VIDEOS = RECIPES / "custom" / "t2v_64px.yaml"

#: Parameters of the reference STARFlow-V 7B model (apple/ml-starflow, counted on the meta device), in
#: billions to the published three decimals.
REFERENCE_BILLIONS = {"shallow block": 0.227, "deep block": 4.842, "denoiser": 0.913}

#: The reference's training and sampling settings for video (apple/ml-starflow's 480p configuration).
REFERENCE_SETTINGS = {"noise_std": 0.5, "guidance": 3.5, "text_dropout": 0.1, "extend_prob": 0.25, "lr": 5e-5,
                      "denoiser_lr": 1e-4, "weight_decay": 1e-4, "min_lr": 1e-6, "grad_clip": 1.0}


def fit_arguments(configs: tuple[Path, ...]) -> list[str]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    return [*args, "--print_config"]


def printed_config(out: str) -> dict:
    return yaml.safe_load(out[out.index("# lightning.pytorch"):])  # after DeepSpeed's import-time log lines


def resolved(capsys, *configs: Path) -> dict:
    """The full config ``flowvid fit`` would run (parsed and checked, nothing instantiated), in this process:
    only for recipes without ZeroStrategy, whose parsing imports DeepSpeed (see ``resolved_apart``)."""
    deepspeed_was_imported = "deepspeed" in sys.modules
    with pytest.raises(SystemExit) as stop:
        main(fit_arguments(configs))
    assert stop.value.code in (0, None)
    assert deepspeed_was_imported or "deepspeed" not in sys.modules, "these recipes need resolved_apart"
    return printed_config(capsys.readouterr().out)


def resolved_apart(*configs: Path) -> dict:
    """``resolved`` in a process of its own: DeepSpeed, imported to parse ZeroStrategy's arguments,
    changes global state that later tests in this process would inherit."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flowvid.lit.cli_support", *fit_arguments(configs)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return printed_config(done.stdout)


def callback_classes(config: dict) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]


@pytest.fixture(scope="module")
def paper_scale() -> dict:
    return resolved_apart(PAPER_SCALE)


def test_the_paper_scale_recipe_is_the_7b_preset_on_zero3(paper_scale):
    config = paper_scale
    flow = config["model"]["init_args"]["flow"]["init_args"]
    assert {k: flow[k] for k in PRESETS["starflow-v-7b"]} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS["starflow-v-7b"].items()}
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "flowvid.lit.strategies.ZeroStrategy" and strategy["init_args"]["stage"] == 3
    assert config["trainer"]["precision"] == "bf16-mixed" and config["resume"] == "auto"
    assert {"RunCheckpoint", "StepSeed", "ActivationCheckpointing"} <= set(callback_classes(config))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_paper_scale_recipe_builds_the_reference_model_with_the_documented_sizes(paper_scale):
    model = paper_scale["model"]["init_args"]
    with torch.device("meta"):  # shapes only: no memory for the 7B weights
        flow = GlobalLocalFlow(**model["flow"]["init_args"])
        denoiser = CausalDenoiser(**model["denoiser"]["init_args"])
    assert {p.device.type for p in [*flow.parameters(), *denoiser.parameters()]} == {"meta"}
    built = {"shallow block": parameter_count(flow.shallow[0]), "deep block": parameter_count(flow.deep),
             "denoiser": parameter_count(denoiser)}
    assert len(flow.shallow) == 5 and len({parameter_count(block) for block in flow.shallow}) == 1
    assert {part: round(count / 1e9, 3) for part, count in built.items()} == REFERENCE_BILLIONS
    flow_count, denoiser_count = parameter_count(flow), built["denoiser"]
    documented = [f"{flow_count / 1e9:.2f}B", f"{denoiser_count / 1e9:.2f}B",
                  f"{(flow_count + denoiser_count) / 1e9:.2f}B"]
    assert documented == ["5.98B", "0.91B", "6.89B"]
    header = PAPER_SCALE.read_text().split("\nseed_everything")[0]
    scaling = (ROOT / "docs" / "scaling.md").read_text().split("## The paper-scale recipe")[1]
    for text in (header, scaling):
        assert [number for number in documented if number not in text] == []


def test_the_paper_scale_recipe_trains_and_samples_with_the_reference_settings(paper_scale):
    model = paper_scale["model"]["init_args"]
    assert {name: model[name] for name in REFERENCE_SETTINGS} == REFERENCE_SETTINGS
    flow, denoiser = model["flow"]["init_args"], model["denoiser"]["init_args"]
    text_encoder, codec = model["text_encoder"]["init_args"], model["codec"]["init_args"]
    assert (denoiser["channels"], denoiser["frame_size"], denoiser["text_width"]) == (
        flow["latent_channels"], flow["frame_size"], flow["text_width"])
    assert (denoiser["width"], denoiser["depth"], denoiser["head_dim"]) == (3072, 8, 64)
    assert (denoiser["window"], denoiser["lookahead"]) == (9, 1)  # frames n - 9 to n + 1
    assert text_encoder["max_length"] == 256 and flow["text_width"] == 2048  # flan-t5-xl
    assert codec["temporal_scale"] == 0.6 and codec["sample_posterior"] is True
    frames, height, width = model["video_shape"]  # Wan2.2: first frame alone, then 4x in time; 16x in space
    assert [(frames - 1) // 4 + 1, height // 16, width // 16] == [21, *flow["frame_size"]]
    trainer = paper_scale["trainer"]
    videos_per_step = (trainer["num_nodes"] * trainer["devices"] * paper_scale["data"]["init_args"]["batch_size"]
                       * model["accumulate_grad_batches"])
    assert videos_per_step == 192


@pytest.mark.parametrize("overlay, strategy, stage", [("ddp", "DDPStrategy", None), ("zero2", "ZeroStrategy", 2),
                                                      ("zero3", "ZeroStrategy", 3)])
def test_distributed_overlays_change_the_strategy_and_add_to_the_callbacks(capsys, overlay, strategy, stage):
    recipes = DEMO, RECIPES / "distributed" / f"{overlay}.yaml"
    config = resolved(capsys, *recipes) if stage is None else resolved_apart(*recipes)
    assert config["trainer"]["strategy"]["class_path"].endswith(strategy)
    assert config["trainer"]["strategy"]["init_args"].get("stage") == stage
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert callback_classes(config)[-1] == "ActivationCheckpointing"
    assert len(callback_classes(config)) == len(yaml.safe_load(DEMO.read_text())["trainer"]["callbacks"]) + 1
    model = resolved(capsys, DEMO)["model"]
    if stage is not None:  # DeepSpeed takes the gradient norm inside its step: no threshold can apply
        model["init_args"]["skip_threshold"] = None
    assert config["model"] == model  # the model recipe is otherwise untouched


def test_the_finetune_overlay_keeps_the_model_and_replaces_data_and_training(capsys):
    base = resolved(capsys, DEMO)
    config = resolved(capsys, DEMO, RECIPES / "finetune" / "custom_shards.yaml")
    model, tuned = base["model"]["init_args"], config["model"]["init_args"]
    assert tuned["flow"] == model["flow"] and tuned["codec"] == model["codec"]
    assert tuned["lr"] < model["lr"]
    assert config["data"]["init_args"]["train_dir"] == "data/custom/train"
    assert callback_classes(config)[:2] == ["InitFromExport", "Freeze"]
    assert config["resume"] == "auto" and config["ckpt_path"] is None


def test_the_lora_overlay_trains_adapters_instead_of_frozen_blocks_on_the_same_data(capsys):
    finetune = resolved(capsys, DEMO, RECIPES / "finetune" / "custom_shards.yaml")
    config = resolved(capsys, DEMO, RECIPES / "finetune" / "custom_shards.yaml", RECIPES / "finetune" / "lora.yaml")
    assert callback_classes(config) == ["InitFromExport", "LoRA", "RunCheckpoint", "StepSeed", "TrainingThroughput"]
    assert config["data"] == finetune["data"] and config["resume"] == "auto"
    assert config["trainer"]["default_root_dir"] != finetune["trainer"]["default_root_dir"]
    assert config["model"]["init_args"]["lr"] > finetune["model"]["init_args"]["lr"]


def clip_spec(command_line: str) -> list[int]:
    """[frames, size, size] of a ``flowvid data from-videos ... --frames N --size S`` line."""
    words = command_line.split()
    size = int(words[words.index("--size") + 1])
    return [int(words[words.index("--frames") + 1]), size, size]


def test_the_own_videos_recipe_trains_on_the_clips_the_readme_makes_with_sizes_that_agree(capsys):
    vocabulary = ["a", "dog", "runs"]
    with pytest.raises(SystemExit) as stop:
        main([*fit_arguments((OWN_VIDEOS,)), "--model.init_args.text_encoder.init_args.vocabulary", str(vocabulary)])
    assert stop.value.code in (0, None)
    config = printed_config(capsys.readouterr().out)
    model = config["model"]["init_args"]
    flow, denoiser = model["flow"]["init_args"], model["denoiser"]["init_args"]
    patch = model["codec"]["init_args"]["patch_size"]
    frames, height, width = model["video_shape"]
    assert (flow["latent_channels"], flow["frame_size"]) == (3 * patch**2, [height // patch, width // patch])
    assert (denoiser["channels"], denoiser["frame_size"], denoiser["text_width"]) == (
        flow["latent_channels"], flow["frame_size"], flow["text_width"])
    assert model["text_encoder"]["init_args"]["vocabulary"] == vocabulary  # the documented override takes
    data = config["data"]["init_args"]
    assert (data["train_dir"], data["val_dir"], data["val_batches"]) == ("data/custom/train", "data/custom/val", None)
    sample_logger = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SampleVideoLogger"))
    assert not sample_logger["init_args"].get("captions")  # the shapes captions mean nothing to your model
    assert config["resume"] == "auto" and "StepSeed" in callback_classes(config)

    header = OWN_VIDEOS.read_text().split("\nresume:")[0]
    readme = (ROOT / "README.md").read_text().splitlines()
    made = [line for line in (*header.splitlines(), *readme) if "flowvid data from-videos" in line]
    assert len(made) == 2 and [clip_spec(line) for line in made] == [[frames, height, width]] * 2
    fit_line = "flowvid fit --config recipes/custom/t2v_64px.yaml"
    fits = [line for line in (*header.splitlines(), *readme) if fit_line in line]
    assert any(line.startswith(fit_line) for line in readme)
    # Both give the encoder the words of the captions the recipe trains on, in a config after the recipe.
    written = f"flowvid data vocabulary {data['train_dir']} --out vocabulary.yaml"
    assert sum(written in line for line in (*header.splitlines(), *readme)) == 2
    assert len(fits) == 2 and all(f"{fit_line} --config vocabulary.yaml" in line for line in fits)


class RefusingStrategy(SingleDeviceStrategy):
    """Refuses its settings when built, as ZeroStrategy refuses a ZeRO stage other than 1, 2 or 3."""

    def __init__(self, stage: int = 1):
        raise ValueError(f"stage {stage} is refused")


def test_a_strategy_that_refuses_its_settings_says_why_in_one_line(capsys):
    # Not ZeroStrategy itself: building it in this process would import DeepSpeed.
    status = main(["fit", "--config", str(DEMO), "--trainer.strategy", f"{__name__}.RefusingStrategy",
                   "--trainer.strategy.init_args.stage", "4"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "flowvid fit: error: trainer.strategy.init_args.stage 4 is refused"
