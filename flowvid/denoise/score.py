"""Flow-score matching: the denoiser's target, read off the likelihood's own backward pass.

Notation: a batch of B noisy latents x~_b with D dimensions each; ``NLL_b`` is the summed negative
log-likelihood of sample b in nats. The training loss is the batch mean of per-dimension NLLs,

    L = (1 / B) * sum_b NLL_b / D        (up to a constant),

so the gradient that its backward pass leaves on the input is ``grad_{x_b} L = grad_{x_b} NLL_b / (B D)``
and the per-sample score is ``grad_{x_b} NLL_b = (B D) * x.grad = x.numel() * x.grad``.

Tweedie's formula gives the clean latents from the score of the noisy density:
``E[x | x~] = x~ + sigma^2 grad log p(x~) = x~ - sigma^2 grad NLL(x~)``. The denoiser learns the
unit-scale quantity ``sigma * grad NLL(x~)`` (for Gaussian noise it is about the noise ``eps`` that was
added) and denoises with ``x~ - sigma * D(x~)``.

``score_matching_tap`` trains the denoiser inside that same backward pass, so one training step has a
single backward: what data-parallel and ZeRO strategies, which reduce gradients at the end of each
backward pass, need.
"""

from __future__ import annotations

import torch

from flowvid.checks import check_positive
from flowvid.text.base import TextEmbedding


def flow_score_target(input_grad: torch.Tensor, noise_std: float) -> torch.Tensor:
    """``sigma * grad NLL_b`` of every sample, from ``x.grad`` of the batch-mean per-dimension loss.

    ``input_grad`` must come from the backward pass of ``L = mean_b(NLL_b / D)`` with nothing else
    scaling it (no fp16 loss scaling, no accumulation divisor). Terms of the loss that are not the NLL
    (a latent-norm penalty) add their own small gradient.
    """
    return (input_grad * (input_grad.numel() * noise_std)).detach()


class _ScoreMatchingTap(torch.autograd.Function):
    """Identity on ``x``; its backward turns the gradient arriving at ``x`` into the denoiser's one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, prediction: torch.Tensor, noise_std: float, loss_scale: float) -> torch.Tensor:
        ctx.save_for_backward(prediction)
        ctx.noise_std = noise_std
        ctx.loss_scale = loss_scale
        return x.clone()

    @staticmethod
    def backward(ctx, input_grad: torch.Tensor):
        (prediction,) = ctx.saved_tensors
        target = flow_score_target(input_grad / ctx.loss_scale, ctx.noise_std)
        # d/dprediction of loss_scale * mse_loss(prediction, target), the mean over every element.
        prediction_grad = 2.0 * (prediction - target) / prediction.numel() * ctx.loss_scale
        return input_grad, prediction_grad, None, None


def score_matching_tap(x: torch.Tensor, prediction: torch.Tensor, noise_std: float,
                       loss_scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, tied to the denoiser's ``prediction`` for it (made from ``x`` detached).

    Feed the result to the flow instead of ``x``: the backward pass of the likelihood loss then also
    gives ``prediction`` the gradient of ``mse_loss(prediction, flow_score_target(x.grad, noise_std))``,
    which trains the denoiser in the same pass; the gradient that reaches ``x`` is the likelihood's
    alone, so the flow learns nothing from the denoiser. ``loss_scale`` is the factor the likelihood
    loss is multiplied by before its backward pass (``1 / k`` when k batches accumulate); the target
    is read off the unscaled gradient, and the denoiser's loss gets the same factor.
    """
    check_positive("noise_std", noise_std)
    check_positive("loss_scale", loss_scale)  # the target is read off the gradient divided by it
    return _ScoreMatchingTap.apply(x, prediction, noise_std, loss_scale)


def tweedie_denoise(flow, x_noisy: torch.Tensor, noise_std: float, text: TextEmbedding | None = None) -> torch.Tensor:
    """One Tweedie step through the flow itself: ``x~ - sigma^2 * grad NLL(x~)`` (fp32).

    The fallback when no denoiser was trained; it needs one backward pass through the flow, so it
    leaves inference mode (Lightning validates under it) and works on copies of its inputs.
    """
    check_positive("noise_std", noise_std)
    with torch.inference_mode(False), torch.enable_grad():
        x = x_noisy.detach().float().clone().requires_grad_(True)
        if text is not None:
            text = TextEmbedding(text.tokens.clone(), text.mask.clone())
        dims = x[0].numel()
        nll_sum = flow.nll(x, text).sum() * dims
        (grad,) = torch.autograd.grad(nll_sum, x)
    return (x - noise_std**2 * grad).detach()
