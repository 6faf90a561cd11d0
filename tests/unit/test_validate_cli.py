"""What `flowvid fit|validate` say of their checkpoint options: the help describes what flowvid takes, and a
name of Lightning's that flowvid does not take is refused in one line before anything is built."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import torch

from flowvid.lit import cli_support
from flowvid.lit.cli_support import main as lightning_main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


def help_of(subcommand: str, capsys) -> str:
    """`flowvid SUBCOMMAND --help`."""
    with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit) as stopped:
        lightning_main([subcommand, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def option_help(shown: str, option: str) -> str:
    """The help of one option, on one line: its first line up to the next that starts an option or a group."""
    lines = shown.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"  {option} "))
    end = next(index for index in range(start + 1, len(lines)) if not lines[index].startswith(" " * 3))
    return " ".join(" ".join(lines[start:end]).split())


def refusal(subcommand: str, *args: str, capsys) -> str:
    """The error `flowvid SUBCOMMAND --config RECIPE ARGS` stops with, status 2, before building anything."""
    built = mock.patch.object(cli_support.FlowvidCLI, "instantiate_classes",
                              side_effect=AssertionError("built the recipe's classes"))
    with mock.patch.object(sys, "argv", ["flowvid"]), built, pytest.raises(SystemExit) as stopped:
        lightning_main([subcommand, "--config", str(RECIPE), *args])
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_validate_help_says_what_ckpt_path_takes_and_offers_no_name_it_refuses(capsys):
    ckpt_path = option_help(help_of("validate", capsys), "--ckpt_path")
    for taken in ("a checkpoint file", "a run directory", "'last'", "export", ".safetensors"):
        assert taken in ckpt_path
    for refused in ("best", "hpc", "registry"):
        assert refused not in ckpt_path


def test_validate_help_says_resume_chooses_what_is_validated_not_where_training_continues(capsys):
    resume = option_help(help_of("validate", capsys), "--resume")
    assert resume.startswith("--resume RESUME What to validate when --ckpt_path is not given")
    assert "continues" not in resume and "starts fresh" not in resume


def test_fit_help_says_what_ckpt_path_takes_and_offers_no_name_it_refuses(capsys):
    shown = help_of("fit", capsys)
    ckpt_path = option_help(shown, "--ckpt_path")
    assert "a run directory" in ckpt_path and "'last'" in ckpt_path and "Not with --resume" in ckpt_path
    for refused in ("best", "hpc", "registry"):
        assert refused not in ckpt_path
    assert "validate" not in option_help(shown, "--resume")


@pytest.mark.parametrize("name", ["best", "hpc", "registry", "registry:my-model:v2", "REGISTRY"])
@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_a_lightning_checkpoint_name_flowvid_does_not_take_is_one_line_saying_what_to_give(subcommand, name,
                                                                                            capsys):
    error = refusal(subcommand, "--ckpt_path", name, capsys=capsys)
    assert error.count("\n") == 1
    assert error.startswith(f"flowvid {subcommand}: error: ckpt_path {name} asks Lightning for ")
    assert "give a checkpoint file, a run directory (its newest checkpoint)" in error
    assert f"./{name}" in error
    assert ("flowvid export" in error) == (subcommand == "validate")


def test_a_file_named_like_a_lightning_name_is_given_as_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with mock.patch.object(sys, "argv", ["flowvid"]):
        status = lightning_main(["validate", "--config", str(RECIPE), "--ckpt_path", "./best"])
    assert status == 2
    assert "asks Lightning" not in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--ckpt_path", "--resume"])
@pytest.mark.parametrize("given", ["folder", "file"])
def test_fit_from_an_export_is_one_line_pointing_at_init_from_export(tmp_path, option, given, capsys):
    exported = tmp_path / "exported"
    exported.mkdir()
    safetensors.torch.save_file({"weight": torch.zeros(1)}, exported / "model.safetensors")
    (exported / "config.yaml").write_text("model: {}\n")
    path = exported if given == "folder" else exported / "model.safetensors"
    with mock.patch.object(sys, "argv", ["flowvid"]), \
            mock.patch.object(cli_support.FlowvidCLI, "instantiate_classes", side_effect=AssertionError("built")):
        status = lightning_main(["fit", "--config", str(RECIPE), option, str(path)])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert error.startswith(f"flowvid fit: error: {option.lstrip('-')} {path} is a flowvid export")
    assert "InitFromExport" in error
