"""Jacobi under a process group: every rank runs as many passes, and its videos still stop on their own
(two gloo processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowvid.flows import GlobalLocalFlow
from flowvid.sampling import JacobiSampler, SequentialSampler
from flowvid.testing import perturb_parameters

SETTINGS = {"tol": 1e-3, "first_block_size": 4}


def make_flow():
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3))
    perturb_parameters(flow, std=0.05)
    return flow.eval()


def noise_of(rank):
    # Rank 1 samples larger noise, which takes more passes: only the all-reduce keeps the ranks in step.
    return torch.randn(1, 3, 2, 3, 3, generator=torch.Generator().manual_seed(rank)) * (1 + 2 * rank)


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = JacobiSampler(**SETTINGS)
        flow = make_flow()
        passes = {"deep": 0}
        affine = flow.deep.affine

        def counted(*args):
            passes["deep"] += 1
            return affine(*args)

        flow.deep.affine = counted
        x = sampler.sample(flow, noise_of(rank))
        torch.save({"x": x, "stats": sampler.last_stats, "forward_calls": passes["deep"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_run_in_step_and_sample_what_they_sample_alone(tmp_path):
    make_flow()  # import every plugin here once; forked ranks inherit them instead of importing again
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    passes = [result["stats"]["deep"]["iterations"] for result in results]
    assert passes[0] == passes[1]  # every rank ran as many passes over every block
    # and called the network as often, as models sharded over the ranks need, though rank 0 was done sooner
    assert results[0]["forward_calls"] == results[1]["forward_calls"]
    assert results[0]["stats"]["deep"]["sample_iterations"] != results[1]["stats"]["deep"]["sample_iterations"]

    torch.set_num_threads(1)
    alone = []
    for rank, result in enumerate(results):  # without a process group each rank would have decided on its own
        sampler = JacobiSampler(**SETTINGS)
        x = sampler.sample(make_flow(), noise_of(rank))
        alone.append(sampler.last_stats["deep"]["iterations"])
        assert torch.equal(result["x"], x)  # a rank's videos stop on their own: the same samples as alone
        reference = SequentialSampler().sample(make_flow(), noise_of(rank))
        assert ((result["x"] - reference).norm() / reference.norm()).item() < 1e-3
    assert alone[0] != alone[1]
