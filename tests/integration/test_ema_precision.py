"""The EMA under DeepSpeed bf16 averages the fp32 master weights that DeepSpeed's optimiser steps, not
the module's bf16 copies of them."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from test_train_loop import fixed_batches, tiny_module, trainer


class AveragesOfBoth(L.Callback):
    """After every step, the moving averages (decay ``decay``, fp32) of the masters and of the module's
    bf16 weights, of what this rank holds of each parameter the EMA averages, read through DeepSpeed's API."""

    def __init__(self, decay: float):
        self.decay, self.of_masters, self.of_bf16 = decay, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        for name, p in pl_module.ema.parameters.items():
            sharded = getattr(p, "ds_tensor", None) is not None
            bf16 = (p.ds_tensor if sharded else p).detach()
            fp32 = safe_get_local_fp32_param(p) if sharded else safe_get_full_fp32_param(p)
            assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
            for averages, weight in ((self.of_masters, fp32.detach()), (self.of_bf16, bf16.float())):
                if name in averages:
                    averages[name].lerp_(weight, 1.0 - self.decay)
                else:
                    averages[name] = weight.clone()


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[n] - b[n]).square().sum() for n in b).sqrt() / sum(b[n].square().sum() for n in b).sqrt())


def ema_under_bf16_zero(stage: int) -> None:
    """Three bf16-mixed steps under ZeRO with an EMA of decay 0.5 (it follows the weights closely, where
    their rounding shows); prints the EMA's relative distance from both reference averages (run in a
    process of its own: DeepSpeed keeps its process group)."""
    from flowvid.lit.strategies import ZeroStrategy, finish_distributed

    L.seed_everything(0)
    module = tiny_module(ema_decay=0.5, lr=3e-3, denoiser_lr=3e-3, text_dropout=0.0)
    both = AveragesOfBoth(decay=0.5)
    trainer(max_steps=3, precision="bf16-mixed", callbacks=[both],
            strategy=ZeroStrategy(stage=stage, logging_batch_size_per_gpu=2)).fit(module, fixed_batches(3))
    print(json.dumps({"of_masters": relative_distance(module.ema.shadow, both.of_masters),
                      "of_bf16": relative_distance(module.ema.shadow, both.of_bf16)}))
    finish_distributed()


@pytest.mark.parametrize("stage", [2, 3])
def test_under_bf16_zero_the_ema_averages_the_fp32_masters(stage):
    """The bf16 weights are the masters rounded, about 1.5e-3 off (relative); an average of them was
    7e-4 off the average of the masters after three steps, which the checkpoint exports as trained."""
    pytest.importorskip("deepspeed")
    script = f"import test_ema_precision as t; t.ema_under_bf16_zero({stage})"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    distance = json.loads(done.stdout.strip().splitlines()[-1])
    assert distance["of_masters"] < 1e-7  # the same fp32 arithmetic on the same weights
    assert distance["of_bf16"] > 1e-4
