"""Noise corruptions: Gaussian, shot (Poisson) and impulse (salt-and-pepper) noise."""

from __future__ import annotations

import torch

from vpt_robust.corruptions.draws import parallel_draws, rand, randn


def gaussian_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """x + N(0, std^2) per value, clipped to [0, 1]."""
    noise = randn(x.shape, gen, x.device, x.dtype)
    return noise.mul_(std).add_(x).clamp_(0.0, 1.0)


def shot_noise(x: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Poisson(x * scale) / scale per value, clipped to [0, 1] (photon counting noise)."""
    rates = x * scale
    if x.device.type != "cpu":
        return torch.poisson(rates, generator=gen).div_(scale).clamp_(0.0, 1.0)
    counts = torch.empty_like(x)

    def fill(rows: slice, g: torch.Generator) -> None:
        counts[rows] = torch.poisson(rates[rows], generator=g)

    parallel_draws(counts, gen, fill)
    return counts.div_(scale).clamp_(0.0, 1.0)


def impulse_noise(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Each value independently becomes 0 or 1 (equally likely) with probability `amount`.

    skimage's random_noise(mode="s&p") draws "flipped" and "salted" separately; one uniform
    u gives the same law: u < amount / 2 -> 0, amount / 2 <= u < amount -> 1.
    """
    u = rand(x.shape, gen, x.device, x.dtype)
    return torch.where(u < amount, (u >= amount / 2.0).to(x.dtype), x)
