"""Blur corruptions: defocus, glass, motion and zoom blur."""

from __future__ import annotations

import torch

from vpt_robust.corruptions.filters import (
    clipped_zoom,
    disk_kernel,
    filter2d_mirror,
    gaussian_filter,
)
from vpt_robust.corruptions.filters import (
    motion_blur as _motion_blur,
)


def defocus_blur(
    x: torch.Tensor, params: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """Correlation with an anti-aliased disk (radius, alias sigma), borders mirrored (OpenCV)."""
    radius, alias = params
    return filter2d_mirror(x, disk_kernel(float(radius), float(alias)), clamp=True)


def glass_shuffle_map(
    batch: int, height: int, width: int, delta: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Draw one pass of the original local pixel "swaps" and return its source map.

    dy, dx ~ U{-d, ..., d - 1} per visited pixel (np.random.randint(-d, d)).
    """
    n = height * width
    dy = torch.randint(-delta, delta, (batch, n), generator=gen, device=device)
    dx = torch.randint(-delta, delta, (batch, n), generator=gen, device=device)
    return glass_source_map(dy, dx, height, width, delta)


def glass_source_map(
    dy: torch.Tensor, dx: torch.Tensor, height: int, width: int, delta: int
) -> torch.Tensor:
    """Source pixel of every output pixel after one pass of the original "swaps".

    The original visits (h, w) from (H - d, W - d) down to (d + 1, d + 1) in reverse raster
    order and executes `x[h, w], x[h', w'] = x[h', w'], x[h, w]` with (h', w') = (h + dy, w + dx).
    On numpy rows that statement is a copy, not a swap (the right-hand side holds views):
    x[h, w] takes the current value of x[h', w'], which is final if (h', w') was visited before
    (it lies later in raster order) and original otherwise. We resolve those copy chains for
    all pixels at once by pointer jumping. dy, dx: (B, H * W) offsets (used where visited).
    Returns (B, H * W) flat indices into the image before the pass.
    """
    batch, n = dy.shape
    device = dy.device
    hh = torch.arange(height, device=device).view(-1, 1)
    ww = torch.arange(width, device=device).view(1, -1)
    visited = ((hh > delta) & (hh <= height - delta) & (ww > delta) & (ww <= width - delta)).view(
        1, n
    )
    pos = torch.arange(n, device=device).view(1, n)
    src = torch.where(visited, pos + dy * width + dx, pos.expand(batch, n))
    follow = visited & visited.expand(batch, n).gather(1, src) & (src > pos)
    ptr = src
    while bool(follow.any()):
        nxt = ptr.gather(1, ptr)
        nxt_follow = follow.gather(1, ptr)
        ptr = torch.where(follow, nxt, ptr)
        follow = follow & nxt_follow
    return ptr


def glass_blur(
    x: torch.Tensor, params: tuple[float, int, int], gen: torch.Generator
) -> torch.Tensor:
    """Gaussian blur, 8-bit quantisation, local pixel shuffling, Gaussian blur again."""
    sigma, delta, iterations = float(params[0]), int(params[1]), int(params[2])
    b, c, h, w = x.shape
    y = torch.floor(gaussian_filter(x, sigma, mode="nearest").clamp_(0.0, 1.0) * 255.0) / 255.0
    source = None
    for _ in range(iterations):
        step = glass_shuffle_map(b, h, w, delta, gen, x.device)
        source = step if source is None else source.gather(1, step)
    if source is not None:
        idx = source.unsqueeze(1).expand(b, c, h * w)
        y = y.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
    return gaussian_filter(y, sigma, mode="nearest").clamp_(0.0, 1.0)


def motion_blur(x: torch.Tensor, params: tuple[int, float], gen: torch.Generator) -> torch.Tensor:
    """ImageMagick motion blur (radius, sigma) along a random angle in [-45, 45) degrees."""
    radius, sigma = params
    angles = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=torch.float64)
    angles = angles * 90.0 - 45.0
    return _motion_blur(x, int(radius), float(sigma), angles, clamp=True, angle_range=(-45.0, 45.0))


def zoom_blur(x: torch.Tensor, zooms: tuple[float, ...], gen: torch.Generator) -> torch.Tensor:
    """Mean of the image and its centre zooms by each factor (deterministic)."""
    acc = x.clone()
    for z in zooms:
        acc.add_(x if z == 1.0 else clipped_zoom(x, z))
    return acc.div_(len(zooms) + 1).clamp_(0.0, 1.0)
