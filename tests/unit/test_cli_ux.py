"""What `flowvid` says to a mistyped command, option or recipe key: one line that names it and the likely fix."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from flowvid.cli import main
from flowvid.lit.cli_support import FlowvidCLI, main as lightning_main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


def fit_error(*args: str, capsys) -> str:
    """The error `flowvid fit ARGS` prints, which must stop it with status 2 while parsing."""
    with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit) as stopped:
        lightning_main(["fit", *args])
    assert stopped.value.code == 2
    return capsys.readouterr().err


def recipe_with(tmp_path: Path, line: str, replacement: str) -> Path:
    text = RECIPE.read_text()
    assert line in text
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace(line, replacement))
    return recipe


@pytest.mark.parametrize("typo, command", [("fitt", "fit"), ("generat", "generate"), ("plugin", "plugins")])
def test_a_mistyped_command_suggests_the_likely_one(typo, command, capsys):
    assert main([typo]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"did you mean {command!r}?" in err


def test_a_command_like_no_other_suggests_none(capsys):
    assert main(["frobnicate"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_a_cut_short_option_is_refused_not_taken_for_the_option_it_begins(capsys):
    """argparse would read --trainer.max_step as --trainer.max_steps: a typo then sets a setting unseen."""
    error = fit_error("--config", str(RECIPE), "--trainer.max_step", "5", "--print_config", capsys=capsys)
    assert "unrecognized arguments: --trainer.max_step (did you mean 'trainer.max_steps'?)" in error


@pytest.mark.parametrize("given, missing, likely", [("flowvid.codecs.PixelCodecc", "'flowvid.codecs' has no 'PixelCodecc'",
                                                       "PixelCodec"),
                                                      ("flowvid.codecz.PixelCodec", "'flowvid' has no 'codecz'", "codecs")])
def test_a_misspelt_class_path_names_the_class_path_and_the_likely_name(given, missing, likely, capsys):
    error = fit_error("--config", str(RECIPE), "--model.init_args.codec.class_path", given, capsys=capsys)
    assert error.startswith("flowvid fit: error: model.init_args.codec.class_path: ")
    assert f"module {missing} (did you mean {likely!r}?)" in error and error.count("\n") == 1


def test_ctrl_c_while_plugins_load_ends_in_one_line_with_status_130(capsys):
    with mock.patch("flowvid.cli.load_plugins", side_effect=KeyboardInterrupt):
        assert main(["generate", "--ckpt", "model.safetensors"]) == 130
    assert capsys.readouterr().err == "flowvid generate: stopped by Ctrl-C\n"


def test_a_mistyped_recipe_key_is_one_line_naming_the_key_the_file_and_the_likely_option(tmp_path, capsys):
    recipe = recipe_with(tmp_path, "    warmup_steps: 50", "    warmup_stepz: 50")
    err = fit_error("--config", str(RECIPE), "--config", str(recipe), capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith(f"flowvid fit: error: model.init_args.warmup_stepz in {recipe}: ")
    assert "did you mean 'warmup_steps'?" in err and "Given value" not in err


def test_a_mistyped_key_of_a_nested_class_gets_its_full_path(tmp_path, capsys):
    recipe = recipe_with(tmp_path, "        deep_depth: 6", "        deep_dept: 6")
    err = fit_error("-c", str(recipe), capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith(f"flowvid fit: error: model.init_args.flow.init_args.deep_dept in {recipe}: ")
    assert "flowvid.flows.GlobalLocalFlow" in err and "did you mean 'deep_depth'?" in err


def test_a_mistyped_trainer_key_in_a_recipe_names_the_file(tmp_path, capsys):
    recipe = recipe_with(tmp_path, "  max_steps: 640", "  max_stepz: 640")
    err = fit_error(f"--config={recipe}", capsys=capsys)
    assert err.count("\n") == 1 and err.startswith(f"flowvid fit: error: trainer.max_stepz in {recipe}: ")
    assert "(did you mean 'trainer.max_steps'?)" in err


def test_a_mistyped_trainer_option_on_the_command_line_gets_the_likely_one(capsys):
    err = fit_error("--config", str(RECIPE), "--trainer.max_stepz", "1", capsys=capsys)
    assert err.count("\n") == 1 and err.startswith("flowvid fit: error: unrecognized arguments: --trainer.max_stepz")
    assert "(did you mean 'trainer.max_steps'?)" in err


def test_a_mistyped_key_on_the_command_line_names_no_file(capsys):
    err = fit_error("--config", str(RECIPE), "--model.init_args.lernin_rate", "1", capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith("flowvid fit: error: model.init_args.lernin_rate: Option 'lernin_rate' is not accepted")


def test_a_wrong_value_names_its_key_but_not_the_recipe_that_also_sets_it(capsys):
    err = fit_error("--config", str(RECIPE), "--model.init_args.lr", "abc", capsys=capsys)
    assert err.count("\n") == 1 and err.startswith("flowvid fit: error: model.init_args.lr: ") and "abc" in err


def overlay(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_mistyped_key_of_a_recipe_given_by_a_relative_path_names_it(tmp_path, monkeypatch, capsys):
    recipe = recipe_with(tmp_path, "    warmup_steps: 50", "    warmup_stepz: 50")
    monkeypatch.chdir(tmp_path)  # jsonargparse reads a recipe from within its directory, here another one
    (tmp_path / "configs").mkdir()
    moved = recipe.rename(tmp_path / "configs" / recipe.name)
    err = fit_error("--config", f"configs/{moved.name}", capsys=capsys)
    assert err.startswith(f"flowvid fit: error: model.init_args.warmup_stepz in configs/{moved.name}: ")


def test_an_overlay_given_before_the_recipe_that_chooses_its_class_says_to_give_it_after(tmp_path, capsys):
    rates = overlay(tmp_path, "rates.yaml", "model:\n  init_args:\n    flow:\n      init_args:\n        deep_depth: 2\n")
    err = fit_error("--config", str(rates), "--config", str(RECIPE), capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith(f"flowvid fit: error: model.init_args.flow.init_args.deep_depth in {rates}: ")
    assert err.endswith(f"; it sets model.init_args before {RECIPE} chooses model.class_path: give --config {rates} "
                        f"after --config {RECIPE} (options: flowvid fit --help)\n")


def test_init_args_for_a_class_an_earlier_recipe_set_to_null_name_both_recipes(tmp_path, capsys):
    settings = yaml.safe_load(RECIPE.read_text())
    settings["model"]["init_args"]["text_encoder"] = None
    recipe = overlay(tmp_path, "unconditional.yaml", yaml.safe_dump(settings))
    words = overlay(tmp_path, "words.yaml",
                    "model:\n  init_args:\n    text_encoder:\n      init_args:\n        vocabulary: [red]\n")
    err = fit_error("--config", str(recipe), "--config", str(words), capsys=capsys)
    assert err.count("\n") == 1
    assert err.startswith(f"flowvid fit: error: model.init_args.text_encoder in {words}: ")
    assert (f"; {recipe} sets model.init_args.text_encoder to null, so these init_args have no class_path or other "
            "settings to join: give model.init_args.text_encoder in full") in err


def test_a_missing_recipe_is_one_line(capsys):
    err = fit_error("--config", "/no/such/recipe.yaml", capsys=capsys)
    assert err.count("\n") == 1 and "/no/such/recipe.yaml" in err and err.startswith("flowvid fit: error: config")


@pytest.mark.parametrize("command", [["export"], ["score"], ["generate"], ["convert"], ["data"], ["data", "verify"],
                                     ["data", "from-videos"]])
def test_help_shows_code_as_the_docs_do_not_as_restructuredtext(command, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--help"])
    shown = capsys.readouterr().out
    assert stopped.value.code == 0 and "usage: flowvid" in shown
    assert "``" not in shown


def test_fit_without_a_recipe_asks_for_one_in_the_commands_name(capsys):
    error = fit_error(capsys=capsys)
    assert error.startswith("flowvid fit: error: data, model must be given: give a recipe, --config RECIPE.yaml")
    assert error.count("\n") == 1


RECIPES = RECIPE.parents[1]
CUSTOM_SHARDS = RECIPES / "finetune" / "custom_shards.yaml"
LORA = RECIPES / "finetune" / "lora.yaml"
T2V_64PX = RECIPES / "custom" / "t2v_64px.yaml"


class Parsed(Exception):
    """Raised where `flowvid fit` would start building the recipe's classes: the command was accepted."""


def check_fit_parses(*args: str) -> None:
    """Fail unless `flowvid fit ARGS` gets through parsing and its checks to building the classes."""
    with mock.patch.object(sys, "argv", ["flowvid"]), \
            mock.patch.object(FlowvidCLI, "before_instantiate_classes", side_effect=Parsed), \
            pytest.raises(Parsed):
        lightning_main(["fit", *args])


def test_lora_given_before_an_overlay_whose_callbacks_replace_its_own_is_refused(capsys):
    # RECIPE stands in for an export's config.yaml: both choose the model that the overlays adjust.
    err = fit_error("--config", str(RECIPE), "--config", str(LORA), "--config", str(CUSTOM_SHARDS), capsys=capsys)
    assert err == (f"flowvid fit: error: {CUSTOM_SHARDS} replaces the trainer.callbacks list of {LORA}, so the run "
                   f"would train without its flowvid.lit.finetune.LoRA: give --config {LORA} after --config "
                   f"{CUSTOM_SHARDS}, or add LoRA to the callbacks of {CUSTOM_SHARDS}\n")


def test_only_a_weight_callback_of_an_overlay_dropped_by_a_later_list_is_refused(tmp_path, capsys):
    check_fit_parses("--config", str(RECIPE), "--config", str(CUSTOM_SHARDS), "--config", str(LORA))  # Freeze goes
    settings = yaml.safe_load(RECIPE.read_text())  # the config of an export of a LoRA run lists its LoRA
    settings["trainer"]["callbacks"].append({"class_path": "flowvid.lit.finetune.LoRA"})
    exported = overlay(tmp_path, "config.yaml", yaml.safe_dump(settings))
    check_fit_parses("--config", str(exported), "--config", str(CUSTOM_SHARDS))
    short = overlay(tmp_path, "adapters.yaml", "trainer:\n  callbacks:\n    - class_path: LoRA\n")
    err = fit_error("--config", str(RECIPE), "--config", str(short), "--config", str(CUSTOM_SHARDS), capsys=capsys)
    assert err.startswith(f"flowvid fit: error: {CUSTOM_SHARDS} replaces the trainer.callbacks list of {short}, ")
    assert "without its flowvid.lit.finetune.LoRA" in err and err.count("\n") == 1


@pytest.mark.parametrize("option", [["--trainer.max_steps", "2"], ["--trainer.max_steps=2"]])
def test_an_option_before_a_config_that_sets_the_same_key_is_refused(option, capsys):
    err = fit_error(*option, "--config", str(T2V_64PX), capsys=capsys)
    assert err == (f"flowvid fit: error: {' '.join(option)} comes before --config {T2V_64PX}, whose "
                   "trainer.max_steps: 4000 replaces it: give options after the configs\n")


def test_only_options_that_a_later_config_sets_are_refused(capsys):
    check_fit_parses("--config", str(T2V_64PX), "--trainer.max_steps", "2")
    check_fit_parses("--trainer.max_epochs", "2", "--config", str(T2V_64PX))  # the recipe leaves it as it is
    # A null inside init_args reaches the parser as a mapping (nulls_as_mappings): its key is still the one given.
    err = fit_error("--model.init_args.flow.init_args.text_width=null", "--config", str(RECIPE), capsys=capsys)
    assert err == (f"flowvid fit: error: --model.init_args.flow.init_args.text_width null comes before --config "
                   f"{RECIPE}, whose model.init_args.flow.init_args.text_width: 64 replaces it: give options after "
                   "the configs\n")
