"""Batched, seeded test-time augmentations (CoTTA's teacher views, TPT's views).

Every function takes (B, 3, H, W) images in [0, 1] on any device and a ``torch.Generator`` on
that device; each sample draws its own parameters (one batched op per transform, no Python
loop over samples), so results are a function of the generator's state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# RGB -> YIQ (NTSC); hue is a rotation of the (I, Q) chroma plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = (0.299, 0.587, 0.114)


def _uniform(
    n: int, low: float, high: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    yiq_m = _YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", yiq_m, x)
    angle = turns * 2 * math.pi
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq_m), yiq)


def color_jitter(x: torch.Tensor, gen: torch.Generator, *, soft: bool = False) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and gamma per sample (CoTTA's ColorJitterPro ranges;
    a fixed order instead of a random one per call; hue as a YIQ chroma rotation)."""
    b, dev = x.shape[0], x.device
    view = (-1, 1, 1, 1)
    bright = (0.8, 1.2) if soft else (0.6, 1.4)
    contrast = (0.85, 1.15) if soft else (0.7, 1.3)
    sat = (0.75, 1.25) if soft else (0.5, 1.5)
    hue = 0.03 if soft else 0.06
    gamma = (0.85, 1.15) if soft else (0.7, 1.3)
    x = (x * _uniform(b, *bright, gen, dev).view(view)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * _uniform(b, *contrast, gen, dev).view(view)).clamp(0, 1)
    gray = _gray(x)
    x = (gray + (x - gray) * _uniform(b, *sat, gen, dev).view(view)).clamp(0, 1)
    x = _hue(x, _uniform(b, -hue, hue, gen, dev)).clamp(0, 1)
    return x.clamp_min(1e-8).pow(_uniform(b, *gamma, gen, dev).view(view))


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(x: torch.Tensor, gen: torch.Generator, *, soft: bool = False) -> torch.Tensor:
    """Rotation (+-15 deg; soft +-8), translation (+-1/16 of the side), scale (0.9..1.1; soft
    0.95..1.05), bilinear, edge pixels repeated outside (CoTTA pads with the edge and crops)."""
    b, dev = x.shape[0], x.device
    deg = 8.0 if soft else 15.0
    lo, hi = (0.95, 1.05) if soft else (0.9, 1.1)
    angle = _uniform(b, -deg, deg, gen, dev) * math.pi / 180
    scale = _uniform(b, lo, hi, gen, dev)
    shift = _uniform(2 * b, -1 / 16, 1 / 16, gen, dev).view(b, 2) * 2  # grid units span 2
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    return _warp(x, theta.to(x.dtype))


def gaussian_blur(
    x: torch.Tensor, gen: torch.Generator, *, sigma: tuple[float, float] = (0.001, 0.5)
) -> torch.Tensor:
    """A 5-tap separable Gaussian blur with a per-sample sigma, reflect padding."""
    b, c, h, w = x.shape
    s = _uniform(b, *sigma, gen, x.device).to(x.dtype)
    taps = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (taps.view(1, -1) / s.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 5, 1), groups=b * c)
    return y.view(b, c, h, w)


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def cotta_augment(x: torch.Tensor, gen: torch.Generator, *, soft: bool = False) -> torch.Tensor:
    """CoTTA's teacher augmentation: colour jitter, affine, blur, flip, noise 0.005, clip."""
    x = color_jitter(x.clamp(0, 1), gen, soft=soft)
    x = random_affine(x, gen, soft=soft)
    x = gaussian_blur(x, gen, sigma=(0.001, 0.25) if soft else (0.001, 0.5))
    x = random_flip(x, gen)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 0.005
    return (x + noise).clamp(0, 1)


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Per sample: a crop of area fraction U(scale) and log-uniform aspect ratio, resized back to
    the input size (bilinear), then a horizontal flip with p = 0.5 (TPT's views of a test image,
    torchvision's RandomResizedCrop ranges; crops never leave the image)."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *scale, gen, dev)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen, dev)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - h)
    sign = torch.ones(b, device=dev)
    if flip:
        sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -sign, sign)
    zero = torch.zeros(b, device=dev)
    theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    return _warp(x, theta.to(x.dtype))
