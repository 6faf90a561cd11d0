"""What fit and validate say of a recipe's values: a refused one by its key, and the damaged data a run skipped."""

import sys
from pathlib import Path
from unittest import mock

import pytest

from flowvid.lit.cli_support import main

RECIPE = Path(__file__).parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"


def fit_error(capsys, tmp_path, *options: str) -> str:
    with mock.patch.object(sys, "argv", ["flowvid"]):
        assert main(["fit", "--config", str(RECIPE), "--trainer.default_root_dir", str(tmp_path / "run"),
                     *options]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value, message", [
    ("data.init_args.batch_size", "0", "data.init_args.batch_size must be >= 1, got 0"),
    ("model.init_args.noise_std", "-0.1", "model.init_args.noise_std must be > 0 and finite, got -0.1"),
    ("model.init_args.flow.init_args.deep_depth", "0",
     "model.init_args.flow.init_args.deep_depth must be an int >= 1, got 0"),
])
def test_a_refused_argument_is_named_by_its_key_in_the_recipe(capsys, tmp_path, option, value, message):
    assert fit_error(capsys, tmp_path, f"--{option}", value) == f"flowvid fit: error: {message}"
    assert not (tmp_path / "run").exists()


def test_the_fit_summary_says_how_much_damaged_data_the_run_skipped():
    from types import SimpleNamespace

    import torch

    from flowvid.lit.cli_support import skipped_data

    def run(skipped):
        metrics = {} if skipped is None else {"data/skipped_samples": torch.tensor(skipped)}
        return SimpleNamespace(callback_metrics=metrics, datamodule=SimpleNamespace(train_dirs=["data/bad"]))

    assert skipped_data(run(72.0)) == ("; skipped 72 samples of damaged data, counted each time they were read "
                                       "(`flowvid data verify data/bad` counts the damaged ones)")
    assert skipped_data(run(0.0)) == skipped_data(run(None)) == ""
