"""The latent-norm penalty: ``sum over the shallow blocks of mean(h^2)`` of their outputs, added to the loss
with its weight. The deep block's output is the noise ``z``, which ``z2`` already pulls towards N(0, I)."""

import pytest
import torch

from flowvid.testing import perturb_parameters

from test_train_module import make_module  # noqa: E402

WEIGHT = 0.5


def penalised_module(weight=WEIGHT):
    module = make_module(text=False, denoiser=False, latent_norm_penalty=weight)
    perturb_parameters(module.flow, std=0.05)  # shallow outputs that differ from their inputs
    return module


def latents(seed=0):
    return torch.randn(2, 3, 2, 3, 12, generator=torch.Generator().manual_seed(seed)) * 2.0


def hand_penalty(flow, x):
    """The shallow blocks run by hand, frame by frame, as the flow runs them."""
    tokens, penalty = x.reshape(-1, flow.tokens_per_frame, x.shape[-1]), 0.0
    for block in flow.shallow:
        tokens, _ = block(tokens)
        penalty = penalty + tokens.pow(2).mean()
    return penalty


def test_the_penalty_is_the_mean_square_of_each_shallow_blocks_output_summed():
    module, x = penalised_module(), latents()
    assert len(module.flow.shallow) >= 1
    terms = module.likelihood_terms(x, None)
    torch.testing.assert_close(terms["penalty"], hand_penalty(module.flow, x))


def test_the_loss_adds_the_penalty_times_its_weight_and_bits_per_dim_leave_it_out():
    module, x = penalised_module(), latents()
    terms = module.likelihood_terms(x, None)
    assert terms["penalty"] > 0.1  # large enough to show in the loss
    torch.testing.assert_close(terms["loss"], terms["z2"] - terms["logdet"] + WEIGHT * terms["penalty"])
    unpenalised = penalised_module(weight=0.0).likelihood_terms(x, None)
    torch.testing.assert_close(terms["nats_per_dim"], unpenalised["nats_per_dim"])
    torch.testing.assert_close(terms["loss"] - unpenalised["loss"], WEIGHT * hand_penalty(module.flow, x))


def test_the_deep_blocks_output_is_not_penalised():
    """Changing only the deep block changes z, and with it z2, but not the penalty."""
    module, x = penalised_module(), latents()
    before = module.likelihood_terms(x, None)
    with torch.no_grad():
        module.flow.deep.proj_out.bias.add_(0.5)
    after = module.likelihood_terms(x, None)
    assert after["z2"].item() != pytest.approx(before["z2"].item(), rel=1e-3)
    torch.testing.assert_close(after["penalty"], before["penalty"], rtol=0, atol=0)
