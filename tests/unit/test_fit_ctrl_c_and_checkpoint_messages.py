"""How `flowvid fit` ends on a Ctrl-C at any moment, and the one-line messages about strategies and checkpoints."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from flowvid.codecs.vae_training import VideoVAEModule
from flowvid.export import check_export_path
from flowvid.lit import cli_support
from flowvid.lit.checkpointing import (METADATA_KEY, AtomicCheckpointIO, CorruptCheckpointError, RunCheckpoint,
                                       consolidated_state_dict, load_client_state)
from test_fit_stops_and_next_steps import SigtermAtSecondStep, said_lines, saved, tiny_vae_fit


@pytest.fixture(autouse=True)
def no_pytest_arguments(monkeypatch):
    monkeypatch.setattr("sys.argv", ["flowvid"])


class InterruptedFile(io.RawIOBase):
    """A file whose third write is interrupted, as a Ctrl-C arriving while ``torch.save`` writes."""

    def __init__(self, file):
        super().__init__()
        self.file, self.writes = file, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.file.write(data)


def ctrl_c_while_saving(monkeypatch) -> None:
    """Every checkpoint write is interrupted part-way; torch.save then raises a RuntimeError whose context is
    the KeyboardInterrupt (its zip writer fails to close)."""
    original = torch.save

    def save(obj, file, *args, **kwargs):
        return original(obj, InterruptedFile(file), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_ctrl_c_while_a_checkpoint_is_written_ends_in_one_line_with_status_130_and_leaves_no_file(
        tmp_path, monkeypatch, capsys):
    ctrl_c_while_saving(monkeypatch)
    assert tiny_vae_fit(tmp_path, 2) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "flowvid fit: stopped by Ctrl-C at once, without saving; the checkpoints saved before are intact")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert saved(tmp_path) == [] and list(checkpoints.iterdir()) == []  # no half-written .partial either


def test_torch_save_turns_a_ctrl_c_into_a_runtime_error_that_is_still_read_as_one():
    with pytest.raises(RuntimeError) as raised:
        torch.save({"weights": torch.zeros(3)}, InterruptedFile(io.BytesIO()))
    assert cli_support.stopped_by_ctrl_c(raised.value)
    assert not cli_support.stopped_by_ctrl_c(RuntimeError("a crash"))


def test_a_ctrl_c_before_the_run_starts_says_so_and_leaves_no_log_folder(tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(VideoVAEModule, "configure_optimizers", interrupted)  # inside Lightning's fit
    with said_lines() as lines:
        assert tiny_vae_fit(tmp_path, 2) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "flowvid fit: stopped by Ctrl-C before the run started"
    assert not any("Detected KeyboardInterrupt" in line for line in [*lines, *captured.out.splitlines()])
    assert not (tmp_path / "run").exists()


def test_a_resume_with_nothing_to_train_leaves_no_new_log_version(tmp_path, capsys):
    assert tiny_vae_fit(tmp_path, 2) == 0
    logs = tmp_path / "run" / "lightning_logs"
    versions = sorted(path.name for path in logs.iterdir())
    capsys.readouterr()
    assert tiny_vae_fit(tmp_path, 2, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and f", logs in {logs}\n" in out
    assert sorted(path.name for path in logs.iterdir()) == versions


def test_the_stop_line_names_the_checkpoint_folder_as_the_summary_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(accelerator="cpu", max_steps=4, default_root_dir="run", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[RunCheckpoint(every_n_train_steps=100)])
    with said_lines() as lines, pytest.raises(SIGTERMException):
        trainer.fit(SigtermAtSecondStep(), DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=2))
    assert f"SIGTERM: stopping after step 2, saved in {os.path.join('run', 'checkpoints')}" in lines


# --- strategies -----------------------------------------------------------------------------------------------


def test_lightnings_deepspeed_strategy_on_a_cpu_is_refused_in_one_line_naming_zero_strategy(tmp_path, capsys):
    assert tiny_vae_fit(tmp_path, 2, "--trainer.strategy=deepspeed", "--trainer.accelerator=cpu") == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("flowvid fit: error: trainer.strategy: Lightning's DeepSpeedStrategy runs only on CUDA")
    assert "flowvid.lit.strategies.ZeroStrategy" in error and "--config recipes/distributed/zero2.yaml" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "likely"), [("stag", "stage"), ("offload_optimizr", "offload_optimizer")])
def test_a_mistyped_strategy_option_names_it_and_the_likely_one(tmp_path, capsys, option, likely):
    with pytest.raises(SystemExit) as exited:
        tiny_vae_fit(tmp_path, 2, "--trainer.strategy=flowvid.lit.strategies.ZeroStrategy",
                     f"--trainer.strategy.init_args.{option}=2")
    assert exited.value.code == 2
    assert (f"trainer.strategy.init_args.{option}: Option '{option}' is not accepted by "
            f"flowvid.lit.strategies.ZeroStrategy (did you mean '{likely}'?)") in capsys.readouterr().err


def test_a_mistyped_option_of_a_plugin_is_named_not_the_classes_it_is_not():
    report = ('Parser key "trainer.plugins":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
              '    - Import path lightning.fabric.plugins.environments.SLURMEnvironment does not correspond to a '
              'subclass of Precision\n'
              "    - Problem with given class_path 'lightning.fabric.plugins.environments.SLURMEnvironment':\n"
              "        Option 'auto_requeu' is not accepted\n    - Expected a <class 'NoneType'>")
    assert cli_support.one_line_error(report, {}) == (
        "trainer.plugins.init_args.auto_requeu: Option 'auto_requeu' is not accepted by "
        "lightning.fabric.plugins.environments.SLURMEnvironment (did you mean 'auto_requeue'?)")


# --- checkpoints ----------------------------------------------------------------------------------------------


def deepspeed_directory(path: Path, world_size: int, ranks: list[int]) -> Path:
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    torch.save({METADATA_KEY: {"world_size": world_size}}, tag / "mp_rank_00_model_states.pt")
    for rank in ranks:
        torch.save({}, tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return path


def test_a_deepspeed_checkpoint_without_a_ranks_shard_names_the_missing_file(tmp_path):
    ckpt = deepspeed_directory(tmp_path / "step=00000004.ckpt", 2, [0])
    missing = ckpt / "checkpoint" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with pytest.raises(CorruptCheckpointError) as raised:
        load_client_state(ckpt)
    assert str(raised.value) == f"{ckpt} was written by 2 ranks but lacks rank 1's optimiser shard: {missing}"


def test_consolidating_a_deepspeed_checkpoint_draws_no_progress_bars(tmp_path, monkeypatch, capsys):
    from deepspeed.utils import zero_to_fp32

    def gather(directory):
        for _ in zero_to_fp32.tqdm(range(3), desc="Gathering sharded weights"):
            pass
        return {"weight": torch.zeros(2)}

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", gather)
    assert set(consolidated_state_dict(deepspeed_directory(tmp_path / "ckpt", 1, [0]), {})) == {"weight"}
    assert "Gathering sharded weights" not in capsys.readouterr().err


def test_a_truncated_checkpoint_gets_one_diagnosis_from_every_reader(tmp_path):
    path = tmp_path / "step=00000002.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    said = []
    for read in (load_client_state, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CorruptCheckpointError) as raised:
            read(path)
        said.append(str(raised.value))
    assert said[0] == said[1] and "truncated" in said[0] and str(path) in said[0]


def test_an_export_name_without_the_ending_mentions_the_folder_form_too():
    with pytest.raises(ValueError) as raised:
        check_export_path(Path("exported/noext"), folder_taken=True)
    assert str(raised.value).endswith(f"name it exported/noext.safetensors, or a folder as exported/noext{os.sep} "
                                      f"(for {Path('exported/noext/model.safetensors')})")
