"""Weather corruptions: snow, frost and fog."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vpt_robust.corruptions import fused
from vpt_robust.corruptions.draws import rand, randn
from vpt_robust.corruptions.filters import clipped_zoom, motion_blur, rgb_to_gray
from vpt_robust.corruptions.frost_textures import N_TEXTURES, frost_texture

# ---------------------------------------------------------------------------------------- snow


def snow(x: torch.Tensor, params: tuple[float, ...], gen: torch.Generator) -> torch.Tensor:
    """Falling snow: a thresholded, zoomed noise layer smeared by motion blur, over a greyed image.

    As in `imagecorruptions` (the original ran ImageMagick on an 8-bit PNG of the layer): the
    layer is motion-blurred in float and rounded to 8 bits afterwards; its angle ~ U(-135, -45).
    """
    loc, scale, zoom, threshold, radius, sigma, blend = params
    b, _, h, w = x.shape
    layer = randn((b, 1, h, w), gen, x.device, x.dtype)
    layer = clipped_zoom(layer.mul_(scale).add_(loc), float(zoom))
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp_(0.0, 1.0)
    angles = torch.rand(b, generator=gen, device=x.device, dtype=torch.float64) * 90.0 - 135.0
    layer = motion_blur(
        layer.contiguous(), int(radius), float(sigma), angles, angle_range=(-135.0, -45.0)
    )
    layer = torch.round(layer * 255.0) / 255.0
    grey = rgb_to_gray(x).mul_(1.5).add_(0.5)
    out = torch.maximum(x, grey).mul_(1.0 - blend).add_(x, alpha=blend)
    return out.add_(layer.add_(layer.flip(-2, -1))).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------- frost

_TEXTURE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _textures(
    table: str, height: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All frost textures, scaled for this table and image size, padded into one stack.

    CIFAR: the original shrinks each photo to 20 % (bilinear) before cropping 32 px. ImageNet:
    photos are cropped at native size; a photo smaller than the image is enlarged (bicubic) by
    1.1 x the factor that makes it cover the image, as `imagecorruptions` does.
    """
    key = (table, height, width, str(device))
    if key in _TEXTURE_CACHE:
        return _TEXTURE_CACHE[key]
    scaled = []
    for i in range(N_TEXTURES):
        tex = frost_texture(i)
        th, tw = tex.shape[-2:]
        if table == "cifar":
            size = (round(th * 0.2), round(tw * 0.2))
            tex = F.interpolate(tex[None], size=size, mode="bilinear", align_corners=False)[0]
        if tex.shape[-2] < height or tex.shape[-1] < width:
            factor = 1.1 * max(height / tex.shape[-2], width / tex.shape[-1])
            size = (math.ceil(tex.shape[-2] * factor), math.ceil(tex.shape[-1] * factor))
            tex = F.interpolate(tex[None], size=size, mode="bicubic", align_corners=False)[0]
        scaled.append(tex.clamp(0.0, 255.0))
    hmax = max(t.shape[-2] for t in scaled)
    wmax = max(t.shape[-1] for t in scaled)
    stack = torch.zeros(N_TEXTURES, 3, hmax, wmax)
    for i, t in enumerate(scaled):
        stack[i, :, : t.shape[-2], : t.shape[-1]] = t
    sizes_h = torch.tensor([t.shape[-2] for t in scaled], device=device)
    sizes_w = torch.tensor([t.shape[-1] for t in scaled], device=device)
    entry = (stack.to(device), sizes_h, sizes_w)
    _TEXTURE_CACHE[key] = entry
    return entry


def frost(
    x: torch.Tensor, params: tuple[float, float], gen: torch.Generator, table: str
) -> torch.Tensor:
    """c0 * image + c1 * (random crop of a random frost texture), clipped.

    Texture i ~ U{0..4} per image, crop corner uniform over the valid range (as the original).
    """
    c_img, c_frost = params
    b, _, h, w = x.shape
    stack, th, tw = _textures(table, h, w, x.device)
    idx = torch.randint(0, N_TEXTURES, (b,), generator=gen, device=x.device)
    span_h = (th[idx] - h).clamp_min(1)
    span_w = (tw[idx] - w).clamp_min(1)
    u = torch.rand((2, b), generator=gen, device=x.device, dtype=torch.float64)
    y0 = torch.minimum((u[0] * span_h).long(), span_h - 1)
    x0 = torch.minimum((u[1] * span_w).long(), span_w - 1)
    return blend_crops(x, stack, idx, y0, x0, c_img, c_frost / 255.0)


def blend_crops(
    x: torch.Tensor,
    stack: torch.Tensor,
    idx: torch.Tensor,
    y0: torch.Tensor,
    x0: torch.Tensor,
    c_img: float,
    c_crop: float,
    method: str = "auto",
) -> torch.Tensor:
    """clip(c_img * x + c_crop * crop) with crop n = stack[idx[n], :, y0[n]:, x0[n]:] (H x W).

    method: "views" (a strided view per image, blended in one pass; fastest on CPU), "gather"
    (one indexed gather for the batch; no host round trip, for accelerators) or "auto".
    """
    if method == "auto":
        method = "views" if x.device.type == "cpu" else "gather"
    b, _, h, w = x.shape
    if method == "views":
        out = torch.empty_like(x)
        for n, (t, r, c) in enumerate(zip(idx.tolist(), y0.tolist(), x0.tolist(), strict=True)):
            crop = stack[t, :, r : r + h, c : c + w]
            torch.add(crop.mul(c_crop), x[n], alpha=c_img, out=out[n])
        return out.clamp_(0.0, 1.0)
    if method != "gather":
        raise ValueError(f"method: {method!r} is not one of 'auto', 'views', 'gather'")
    rows = y0[:, None] + torch.arange(h, device=x.device)[None]
    cols = x0[:, None] + torch.arange(w, device=x.device)[None]
    chan = torch.arange(3, device=x.device)
    crop = stack[idx[:, None, None, None], chan[None, :, None, None], rows[:, None, :, None],
                 cols[:, None, None, :]]  # fmt: skip
    return torch.add(crop.mul_(c_crop), x, alpha=c_img).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------- fog


def plasma_fractal(
    batch: int, mapsize: int, decay: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Diamond-square height maps (B, mapsize, mapsize) in [0, 1], toroidal as the original.

    Every new point is the mean of its 4 neighbours plus wibble * U(-wibble, wibble); wibble
    starts at 100 and is divided by `decay` after each level.
    """
    return normalize_maps(
        plasma_from_uniforms(plasma_uniforms(batch, mapsize, gen, device), mapsize, decay)
    )


def plasma_uniforms(
    batch: int, mapsize: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """All levels' uniforms in one draw: a level with n x n corners takes 3 n^2 of them (n = 1,
    2, 4, ...), mapsize^2 - 1 in all."""
    if mapsize < 1 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize: {mapsize} is not a power of two")
    return rand((batch, mapsize * mapsize - 1), gen, device)


def plasma_from_uniforms(uniforms: torch.Tensor, mapsize: int, decay: float) -> torch.Tensor:
    """The unnormalised diamond-square map (B, mapsize, mapsize) from `plasma_uniforms`.

    Each level works densely on its corner grid corners[i, j] = map[i * step, j * step] and
    interleaves the three new point sets with it (pixel_shuffle) instead of writing into
    strided views of the full map.
    """
    batch = uniforms.shape[0]
    corners = torch.zeros(batch, 1, 1, dtype=torch.float32, device=uniforms.device)
    wibble, offset = 100.0, 0
    while corners.shape[-1] < mapsize:
        n = corners.shape[-1]
        draws = uniforms[:, offset : offset + 3 * n * n].view(batch, 3, n, n)
        offset += 3 * n * n
        noise = draws.mul(2 * wibble * wibble).sub_(wibble * wibble)  # wibble * U(-w, w)
        squares = corners + corners.roll(-1, dims=1)
        centres = torch.add(noise[:, 0], squares + squares.roll(-1, dims=2), alpha=0.25)
        left = (centres + corners).add_(centres.roll(1, dims=1)).add_(corners.roll(-1, dims=2))
        top = (centres + corners).add_(centres.roll(1, dims=2)).add_(corners.roll(-1, dims=1))
        left = torch.add(noise[:, 1], left, alpha=0.25)
        top = torch.add(noise[:, 2], top, alpha=0.25)
        # Channel 2 * i + j goes to (2y + i, 2x + j): corners, left (even row, odd column),
        # top (odd row, even column), centres.
        corners = F.pixel_shuffle(torch.stack([corners, left, top, centres], dim=1), 2)[:, 0]
        wibble /= decay
    return corners


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map shifted and scaled to [0, 1]."""
    flat = maps.reshape(maps.shape[0], -1)
    # Two reductions: aminmax along a dim took 10x as long as amin + amax on CPU.
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return (maps - lo.view(-1, 1, 1)).div_((hi - lo).view(-1, 1, 1))


def fog(x: torch.Tensor, params: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Add a plasma-fractal haze, then rescale by max / (max + strength) (per image).

    On CUDA with Triton the fractal levels and the blend run as fused kernels (`fused.py`);
    same uniforms, same result up to float rounding.
    """
    strength, decay = params
    b, _, h, w = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()
    uniforms = plasma_uniforms(b, mapsize, gen, x.device)
    if fused.available(x.device) and x.dtype == torch.float32:
        try:
            return fused.fog_blend(x, fused.plasma_map(uniforms, mapsize, float(decay)), strength)
        except Exception as error:  # Triton present but unable to build or launch here
            fused.disable(error)
    haze = normalize_maps(plasma_from_uniforms(uniforms, mapsize, float(decay)))
    # An explicitly expanded haze: broadcasting the (B, 1, H, W) operand was 2x slower on CPU.
    haze = haze[:, None, :h, :w].to(x.dtype).contiguous().expand_as(x)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.add(x, haze, alpha=strength).mul_(max_val / (max_val + strength)).clamp_(0.0, 1.0)
