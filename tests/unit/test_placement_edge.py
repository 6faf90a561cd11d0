"""Placement settings at their edges: a launch environment torchrun did not write, the CPU's bf16 detection,
ZeRO settings that cannot run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowvid.placement as placement
from flowvid.cli import main

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launch_environment(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("given, missing", [("WORLD_SIZE", "RANK"), ("RANK", "WORLD_SIZE")])
def test_rank_or_world_size_alone_is_refused_not_run_as_rank_0(monkeypatch, given, missing):
    monkeypatch.setenv(given, "2" if given == "WORLD_SIZE" else "0")
    with pytest.raises(ValueError, match=f"{given}=.* is set but {missing} is not: start the processes with torchrun"):
        placement.launch_rank()


def test_generate_refuses_world_size_alone_before_the_model_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    status = main(["generate", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "a red circle",
                   "--out", str(tmp_path / "out")])
    assert status == 2
    assert "WORLD_SIZE='2' is set but RANK is not" in capsys.readouterr().err.strip().splitlines()[-1]


def test_score_names_the_missing_rendezvous_address(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="RANK=0 and WORLD_SIZE=2 are set but MASTER_PORT is not: start the "):
        placement.join_launch_group()
    assert not torch.distributed.is_initialized()


def test_a_local_rank_that_is_no_gpu_index_is_named_as_such(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match=r"LOCAL_RANK='-1' must be a GPU index"):
        placement.resolve_device("auto")


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_local_rank_past_the_gpus_names_local_rank_and_the_gpu_count(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=2 but this machine has 2 GPU\(s\): start at most 2 processes "
                                         r"per machine \(torchrun --nproc-per-node 2\)$"):
        placement.resolve_device(device)


@pytest.fixture
def current_gpu_without_bf16_beside_one_with_it(monkeypatch):
    """cuda:0 a Turing card without bf16, cuda:1 an Ampere card with it; the current GPU is the returned list's
    one item. Both torch's bf16 check and the compute capability answer, for whichever way the GPU is asked."""
    capabilities = {0: (7, 5), 1: (8, 0)}
    current = [0]

    def exchange_device(index):
        previous, current[0] = current[0], index if index >= 0 else current[0]
        return previous

    def capability(device=None):
        index = current[0] if device is None else torch.cuda._utils._get_device_index(device, optional=True)
        return capabilities[current[0] if index is None else index]

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange_device)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: capability() >= (8, 0))
    return current


def test_auto_precision_asks_the_gpu_it_places_on_about_bf16(current_gpu_without_bf16_beside_one_with_it):
    current = current_gpu_without_bf16_beside_one_with_it
    assert placement.resolve_precision("auto", torch.device("cuda", 1)) == "bf16-mixed"
    assert current == [0]
    current[0] = 1
    assert placement.resolve_precision("auto", torch.device("cuda", 0)) == "32-true"
    assert current == [1]


@pytest.fixture
def turing_gpu(monkeypatch):
    """A GPU before Ampere (compute capability 7.5): torch's bf16 check answers yes to bf16 it emulates,
    unless asked about native support alone."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)


def test_auto_precision_is_fp32_on_a_gpu_that_only_emulates_bf16(turing_gpu):
    assert placement.resolve_precision("auto", torch.device("cuda")) == "32-true"


def test_bf16_mixed_on_a_gpu_that_only_emulates_bf16_warns(turing_gpu):
    with pytest.warns(UserWarning, match="GPU cuda has no native bf16 .* runs emulated and slower than 32-true"):
        assert placement.resolve_precision("bf16-mixed", torch.device("cuda")) == "bf16-mixed"


@pytest.fixture
def x86_cpu_with_avx512_only(monkeypatch):
    """A Skylake-to-Ice-Lake Xeon: AVX-512, which oneDNN's bf16 check asks for, but no AVX512-BF16 or AMX."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_an_avx512_cpu_without_avx512_bf16_has_no_native_bf16(x86_cpu_with_avx512_only):
    assert not placement.cpu_has_native_bf16()
    with pytest.warns(UserWarning, match="no native bf16 .*: bf16-mixed runs emulated"):
        placement.resolve_precision("bf16-mixed", torch.device("cpu"))


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True)])
def test_avx512_bf16_or_amx_is_native_bf16(monkeypatch, x86_cpu_with_avx512_only, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert placement.cpu_has_native_bf16()


def test_training_in_bf16_true_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16-true runs emulated and slower than 32-true"):
        placement.warn_if_bf16_is_emulated("bf16-true", torch.device("cpu"))


@pytest.fixture
def deepspeed_strategy_never_built(monkeypatch):
    """ZeroStrategy refuses its stage before building Lightning's DeepSpeedStrategy, which imports DeepSpeed
    (not to be imported in this process): a stage let through fails the test instead."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    def built(*args, **kwargs):
        raise AssertionError("the stage was accepted")

    monkeypatch.setattr(DeepSpeedStrategy, "__init__", built)


@pytest.mark.parametrize("stage, shown", [("2", "'2'"), (True, "True"), (0, "0")])
def test_a_zero_stage_that_is_no_number_1_to_3_is_refused_as_written(deepspeed_strategy_never_built, stage, shown):
    from flowvid.lit.strategies import ZeroStrategy

    with pytest.raises(ValueError, match=f"ZeRO stage must be 1, 2 or 3 \\(a number\\), got {shown}; "):
        ZeroStrategy(stage=stage)


@pytest.mark.slow
def test_zero_with_an_offloaded_optimizer_is_refused_in_one_line_before_training(tmp_path):
    # In a process of its own: building ZeroStrategy imports DeepSpeed.
    demo = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"
    zero2 = demo.parents[1] / "distributed" / "zero2.yaml"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flowvid.lit.cli_support", "fit", "--config", str(demo),
                           "--config", str(zero2), "--trainer.precision", "32-true",
                           "--trainer.strategy.init_args.offload_optimizer", "true",
                           "--trainer.default_root_dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "flowvid fit: error: ZeroStrategy offload_optimizer: DeepSpeed offloads only its own optimiser")
