"""Classifier-free guidance for affine flows, in the variance-clipped form.

For one token the conditional and unconditional branches predict Gaussians ``N(mu_c, sigma_c^2)`` and
``N(mu_u, sigma_u^2)`` for ``x``. Guidance samples from ``p_c^(1+w) / p_u^w`` instead, which is again a
Gaussian. Its precision ``(1+w)/sigma_c^2 - w/sigma_u^2`` goes negative once ``sigma_u < sigma_c``
and ``w`` is large, so the ratio ``s = (sigma_c / sigma_u)^2`` is clipped at 1 (the unconditional
branch may sharpen the result but never widens it past ``sigma_c``)::

    s       = min(sigma_c / sigma_u, 1)^2
    sigma~  = sigma_c / sqrt(1 + w - w s)
    mu~     = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)

With ``w = 0`` this is exactly ``(mu_c, sigma_c)``. Only the deep block is guided.
"""

from __future__ import annotations

import torch


def guided_affine(
    mu_cond: torch.Tensor,
    sigma_cond: torch.Tensor,
    mu_uncond: torch.Tensor,
    sigma_uncond: torch.Tensor,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided ``(mu, sigma)`` in fp32 from the two branches' affine parameters."""
    if weight < 0:
        raise ValueError(f"guidance weight must be >= 0, got {weight}")
    mu_cond, sigma_cond, mu_uncond, sigma_uncond = (t.float() for t in (mu_cond, sigma_cond, mu_uncond, sigma_uncond))
    ratio = (sigma_cond / sigma_uncond).clamp(max=1.0).square()
    precision_gain = 1.0 + weight - weight * ratio  # >= 1 thanks to the clip
    sigma = sigma_cond / precision_gain.sqrt()
    mu = ((1.0 + weight) * mu_cond - weight * ratio * mu_uncond) / precision_gain
    return mu, sigma
