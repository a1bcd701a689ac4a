"""Procedural stand-ins for the frost photographs of the original frost corruption.

The original blends the image with a random crop of one of five frost photos (frost1..frost5;
a sixth ships but `randint(5)` never picks it). We ship no photos: each texture here is
generated deterministically (fixed seeds, CPU, float64) from
  * a cloudy base with the photos' power spectrum (power ~ 1/f^2, measured slopes -1.7..-2.2),
  * ice "needles": thin tapered line strokes in locally coherent orientations, at two scales,
and then each channel is mapped through the quantiles measured on the corresponding photo
(0, 1, 5, ..., 99, 100 %), so brightness, contrast and tint match the original texture that the
same draw would have picked. Sizes equal the photos', so crops cover the same relative area.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

_QUANTILE_LEVELS = (0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 100.0)

# Per photo: (height, width), per-channel (R, G, B) quantiles at _QUANTILE_LEVELS (0..255),
# spectral slope of the photo's grey level, share of needle strokes in the structure.
_TEXTURES: tuple[dict, ...] = (
    {
        "size": (600, 900),
        "quantiles": (
            (15, 31, 40, 46, 57, 74, 95, 115, 127, 150, 201),
            (99, 116, 123, 128, 137, 148, 160, 171, 178, 190, 230),
            (115, 134, 141, 146, 155, 166, 176, 186, 191, 202, 235),
        ),
        "slope": -2.09,
        "needles": 0.25,
    },
    {
        "size": (315, 560),
        "quantiles": (
            (55, 138, 162, 173, 189, 204, 216, 225, 230, 241, 253),
            (56, 140, 165, 176, 193, 209, 221, 230, 235, 245, 255),
            (60, 146, 172, 184, 202, 218, 231, 240, 244, 250, 255),
        ),
        "slope": -2.12,
        "needles": 0.7,
    },
    {
        "size": (315, 560),
        "quantiles": (
            (55, 138, 162, 173, 189, 204, 216, 225, 230, 241, 253),
            (56, 140, 165, 176, 193, 209, 221, 230, 235, 245, 255),
            (60, 146, 172, 184, 202, 218, 231, 240, 244, 250, 255),
        ),
        "slope": -2.12,
        "needles": 0.7,
    },
    {
        "size": (350, 527),
        "quantiles": (
            (15, 69, 91, 102, 120, 138, 155, 171, 183, 218, 251),
            (24, 84, 105, 118, 135, 153, 170, 186, 199, 234, 255),
            (31, 92, 115, 129, 147, 165, 183, 201, 214, 249, 255),
        ),
        "slope": -1.69,
        "needles": 0.6,
    },
    {
        "size": (495, 660),
        "quantiles": (
            (14, 34, 48, 59, 79, 107, 140, 174, 195, 233, 255),
            (25, 45, 60, 70, 91, 119, 151, 183, 203, 238, 255),
            (36, 57, 72, 83, 104, 131, 161, 192, 211, 243, 255),
        ),
        "slope": -2.15,
        "needles": 0.75,
    },
)

N_TEXTURES = len(_TEXTURES)
_SEED = 20190506  # fixed: the textures are part of the corruption's definition


def _spectral_noise(h: int, w: int, slope: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise with power spectrum ~ f^slope (slope < 0), standardised."""
    white = torch.randn(h, w, generator=gen, dtype=torch.float64)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, -1)
    f = torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / max(h, w))
    field = torch.fft.irfft2(torch.fft.rfft2(white) * f ** (slope / 2), s=(h, w))
    return (field - field.mean()) / field.std()


def _line_kernel(length: int, angle: float) -> torch.Tensor:
    """A thin, tapered stroke of `length` px through the kernel centre at `angle` radians."""
    r = length // 2
    coords = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    k = torch.exp(-0.5 * (across / 0.6) ** 2) * torch.clamp(1 - (along.abs() / (r + 0.5)), min=0)
    return k / k.sum()


def _needles(h: int, w: int, gen: torch.Generator, density: float, length: int) -> torch.Tensor:
    """Sparse seeds drawn as strokes whose orientation follows a smooth random field."""
    n_angles = 8
    orient = _spectral_noise(h, w, -4.0, gen)
    bins = ((orient * 0.6 + 0.5) * n_angles).floor().long() % n_angles
    seeds = (torch.rand(h, w, generator=gen, dtype=torch.float64) < density).double()
    seeds = seeds * (0.5 + torch.rand(h, w, generator=gen, dtype=torch.float64))
    r = length // 2
    size = (h + 2 * r, w + 2 * r)
    masks = (F.one_hot(bins, n_angles).permute(2, 0, 1) * seeds).float()
    kernels = torch.zeros(n_angles, *size)
    for a in range(n_angles):
        kernels[a, :length, :length] = _line_kernel(length, math.pi * a / n_angles).float()
    spec = (torch.fft.rfft2(masks, s=size) * torch.fft.rfft2(kernels)).sum(0)
    # Linear convolution via the FFT; each stroke centred on its seed.
    return torch.fft.irfft2(spec, s=size)[r : r + h, r : r + w].double()


def _ranks(field: torch.Tensor) -> torch.Tensor:
    """Percentile rank (0..100) of every value of the field."""
    flat = field.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.linspace(0.0, 100.0, flat.numel(), dtype=torch.float64)
    return ranks.view_as(field)


def _quantile_map(ranks: torch.Tensor, quantiles: tuple[int, ...]) -> torch.Tensor:
    """Map percentile ranks onto a piecewise-linear quantile function."""
    mapped = np.interp(ranks.numpy(), _QUANTILE_LEVELS, np.asarray(quantiles, dtype=np.float64))
    return torch.from_numpy(mapped)


@lru_cache(maxsize=N_TEXTURES)
def frost_texture(index: int) -> torch.Tensor:
    """Texture `index` (0..4) as a (3, H, W) float32 CPU tensor in [0, 255], deterministic."""
    if not 0 <= index < N_TEXTURES:
        raise ValueError(f"index: frost texture {index} does not exist (0..{N_TEXTURES - 1})")
    spec = _TEXTURES[index]
    h, w = spec["size"]
    gen = torch.Generator().manual_seed(_SEED + index)
    base = _spectral_noise(h, w, spec["slope"], gen)
    needles = _needles(h, w, gen, density=0.004, length=31) + 0.5 * _needles(
        h, w, gen, density=0.02, length=9
    )
    needles = (needles - needles.mean()) / needles.std()
    mix = spec["needles"]
    field = (1 - mix) * base + mix * needles
    ranks = _ranks(field)
    channels = [_quantile_map(ranks, q) for q in spec["quantiles"]]
    return torch.stack(channels).to(torch.float32)


def frost_textures_np() -> list[np.ndarray]:
    """All textures as (H, W, 3) uint8 arrays (for inspection and tests)."""
    return [
        frost_texture(i).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        for i in range(N_TEXTURES)
    ]
