"""Digital corruptions: brightness, contrast, elastic transform, pixelate and JPEG compression."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from vpt_robust.corruptions.draws import rand
from vpt_robust.corruptions.filters import gaussian_filter, sample_bilinear


def brightness(x: torch.Tensor, delta: float, gen: torch.Generator) -> torch.Tensor:
    """Add `delta` to the HSV value (clipped at 1), hue and saturation unchanged.

    With V = max over channels, the HSV round trip scales every channel by V' / V, so this is
    exactly skimage's rgb2hsv -> V += delta -> hsv2rgb, without the colour-space conversion.
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp_(max=1.0)
    ratio = v_new / v.clamp_min(1e-12)
    # Black pixels (V = 0, so x = 0 and x * ratio = 0) become grey V'; every other pixel gets
    # x * ratio + 0 exactly. One fused pass instead of a product and a select; the (B, 1, H, W)
    # operands are expanded explicitly (implicit broadcasting over channels was slower on CPU).
    black = torch.where(v > 0, 0.0, v_new)
    return torch.addcmul(black.expand_as(x), x, ratio.expand_as(x)).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    """Shrink each channel's deviation from its own spatial mean by `factor`.

    As factor * x + (1 - factor) * mean: for x in [0, 1] and factor in [0, 1] that stays in
    [0, 1] in float32 too (factor + fl(1 - factor) rounds to at most 1), so no clipping pass.
    """
    means = x.mean(dim=(2, 3), keepdim=True)
    out = torch.add(means.mul_(1.0 - factor), x, alpha=factor)
    return out if 0.0 <= factor <= 1.0 else out.clamp_(0.0, 1.0)


def _affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine maps taking 3 source points to 3 destination points (cv2 convention)."""
    ones = torch.ones(*src.shape[:-1], 1, dtype=src.dtype, device=src.device)
    a = torch.cat([src, ones], dim=-1)  # (B, 3, 3) rows [x, y, 1]
    return torch.linalg.solve(a, dst).transpose(1, 2)


def warp_affine_mirror(img: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(img, M, (W, H), INTER_LINEAR, BORDER_REFLECT_101) for a batch of M.

    OpenCV samples dst(p) = src(M^-1 p) with source positions rounded to 1/32 pixel.
    """
    b, _, h, w = img.shape
    full = torch.zeros(b, 3, 3, dtype=torch.float64, device=img.device)
    full[:, :2] = matrix
    full[:, 2, 2] = 1.0
    inv = torch.linalg.inv(full)[:, :2].reshape(b, 2, 3, 1, 1) * 32.0
    yy = torch.arange(h, dtype=torch.float64, device=img.device).view(h, 1)
    xx = torch.arange(w, dtype=torch.float64, device=img.device).view(1, w)
    # Source (x, y) in 1/32 pixels as the sum of a per-column and a per-row term: one full-size
    # float64 pass instead of a (2 x 3) @ (3 x HW) product. Multiples of 1/32 are exact in
    # float32, so the rescaling after the cast loses nothing.
    src = torch.add(inv[:, :, 0] * xx, inv[:, :, 1] * yy + inv[:, :, 2]).round_()
    src = src.to(img.dtype).mul_(1.0 / 32.0)  # (B, 2, H, W)
    return sample_bilinear(img, src, mode="mirror")


def elastic_transform(
    x: torch.Tensor, params: tuple[float, float, float], gen: torch.Generator
) -> torch.Tensor:
    """Random affine warp, then a smooth random displacement field (the original ImageNet-C /
    CIFAR-10-C definition; `imagecorruptions` replaced it by a size-relative variant).

    params = (alpha, sigma, jitter) in pixels: the three affine anchor points move by
    U(-jitter, jitter); the displacement is alpha * Gaussian_sigma(U(-1, 1)) per axis
    (scipy "reflect" borders, truncate 3, reflected as often as a kernel wider than the image
    needs); resampling is bilinear with reflected borders.

    At 224 px this distorts more than `imagecorruptions` 1.1.2's elastic_transform, by
    definition: ImageNet-C severities 1-2 are affine warps with anchor jitter up to 24 / 49 px
    (plus a near-uniform shift from sigma 171 / 20 px), 3-5 a 4.9 px jitter plus 1-2 px of local
    displacement, while the package has no affine part (sigma 1% of the side, field U(+-0.5% of
    the side) x alpha 12.5..30: 1-2.4 px). Mean |out - clean| on 224 px photos is 3.4-4.2x the
    package's at severities 1-2 and 1.1-1.5x at 3-5; ours equals make_imagenet_c.py's output
    given the same draws (tests/test_corruption_fidelity.py).
    """
    b, _, h, w = x.shape
    jitter = torch.rand((b, 3, 2), generator=gen, device=x.device, dtype=torch.float32) * 2 - 1
    fields = rand((b, 2, h, w), gen, x.device, x.dtype).mul_(2.0).sub_(1.0)
    return elastic_from_draws(x, params, jitter, fields)


def elastic_from_draws(
    x: torch.Tensor, params: tuple[float, float, float], jitter: torch.Tensor, fields: torch.Tensor
) -> torch.Tensor:
    """The elastic transform given its random draws: jitter (B, 3, 2) and fields (B, 2, H, W),
    both U(-1, 1); fields[:, 0] displaces x (columns), fields[:, 1] displaces y (rows)."""
    alpha, sigma, spread = (float(p) for p in params)
    b, _, h, w = x.shape
    cy, cx = float(h // 2), float(w // 2)  # the original's center_square = [H // 2, W // 2]
    s = float(min(h, w) // 3)
    pts1 = torch.tensor(
        [[cy + s, cx + s], [cy + s, cx - s], [cy - s, cx - s]], dtype=torch.float32, device=x.device
    ).expand(b, 3, 2)
    pts2 = pts1 + jitter.to(torch.float32) * spread
    warped = warp_affine_mirror(x, _affine_from_points(pts1.double(), pts2.double()))
    disp = gaussian_filter(fields, sigma, mode="reflect", truncate=3.0)
    yy, xx = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=x.dtype),
        torch.arange(w, device=x.device, dtype=x.dtype),
        indexing="ij",
    )
    coords = torch.add(torch.stack([xx, yy])[None], disp, alpha=alpha)  # (B, 2, H, W): x, y
    return sample_bilinear(warped, coords, mode="reflect").clamp_(0.0, 1.0)


@lru_cache(maxsize=64)
def _box_ranges(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel range [lo, hi) that PIL's BOX filter averages for each output pixel (downscaling).

    PIL weights input pixel j by box(((j - centre) + 0.5) / scale) with box(t) = 1 on
    (-0.5, 0.5] and centre = (i + 0.5) * scale: the pixels whose centres fall in the output
    pixel's footprint. Same float64 expressions as PIL, so boundary cases fall the same way.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support, inv = 0.5 * filterscale, 1.0 / filterscale
    lo = np.zeros(n_out, dtype=np.int64)
    hi = np.zeros(n_out, dtype=np.int64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), n_in)
        taps = [j for j in range(xmin, xmax) if -0.5 < ((j - centre) + 0.5) * inv <= 0.5]
        lo[i], hi[i] = taps[0], taps[-1] + 1
    return lo, hi


# PIL's resampler works in fixed point: coefficients with this many fractional bits.
_PIL_PRECISION_BITS = 22


def _box_down_8bit(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """One PIL BOX downscaling pass along `dim`: each output pixel's box mean, rounded to 8 bits.

    PIL rounds with 22-bit coefficients round(2^22 / count): a mean exactly halfway between two
    levels goes up where the coefficients sum to 2^22 or more and down where they fall short
    (counts 10, 12, 14, ...); any other mean is at least 1 / (2 count) levels from a half,
    beyond the fixed point's error. So we round the float mean with a tie-break margin of a
    quarter of that gap, signed as PIL's coefficient sum, and match PIL on 8-bit input.
    """
    lo, hi = _box_ranges(x.shape[dim], n_out)
    counts = hi - lo
    one = 1 << _PIL_PRECISION_BITS
    coefs = np.floor(0.5 + (1.0 / counts) * one)
    margin = np.where(coefs * counts >= one, 0.25, -0.25) / counts
    shape = [1] * x.dim()
    shape[dim] = n_out
    count = torch.as_tensor(counts, dtype=x.dtype, device=x.device)
    out = None
    for t in range(int(counts.max())):
        valid = torch.as_tensor((lo + t < hi).astype(np.float32), device=x.device).to(x.dtype)
        idx = torch.as_tensor(np.minimum(lo + t, hi - 1), device=x.device)
        term = x.index_select(dim, idx) * (valid / count).view(shape)
        out = term if out is None else out.add_(term)
    assert out is not None
    offset = torch.as_tensor(0.5 + margin, dtype=x.dtype, device=x.device).view(shape)
    return out.mul_(255.0).add_(offset).floor_().div_(255.0)


@lru_cache(maxsize=64)
def _box_up_index(n_in: int, n_out: int) -> np.ndarray:
    """Source pixel of each output pixel in PIL's BOX upscaling, in PIL's float64 arithmetic.

    PIL takes the one pixel at (int)(centre - 0.5 + 0.5), centre = (i + 0.5) * n_in / n_out.
    """
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out)
    return np.minimum(np.trunc(centre - 0.5 + 0.5).astype(np.int64), n_in - 1)


@lru_cache(maxsize=64)
def _nearest_exact_is_pil(n_in: int, n_out: int, device: str) -> bool:
    """Whether PyTorch's "nearest-exact" (float32 arithmetic) picks PIL's pixels for this size
    pair; both floor (i + 0.5) * n_in / n_out, and differ only where that is within rounding of
    an integer (24 -> 37 at i = 18: 12 in float64, just under 12 in float32)."""
    probe = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in, 1)
    picked = F.interpolate(probe, size=(n_out, 1), mode="nearest-exact").view(-1).long().cpu()
    return bool(torch.equal(picked, torch.from_numpy(_box_up_index(n_in, n_out))))


def _box_up(small: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL BOX upscaling of (B, C, h, w) to (height, width): each output pixel copies one input
    pixel. One interpolation kernel where it picks PIL's pixels, two gathers elsewhere."""
    sh, sw = small.shape[-2:]
    device = str(small.device)
    if _nearest_exact_is_pil(sh, height, device) and _nearest_exact_is_pil(sw, width, device):
        return F.interpolate(small, size=(height, width), mode="nearest-exact")
    rows = torch.from_numpy(_box_up_index(sh, height)).to(small.device)
    cols = torch.from_numpy(_box_up_index(sw, width)).to(small.device)
    return small.index_select(2, rows).index_select(3, cols)


def pixelate(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    """Shrink by `factor` with PIL's BOX filter, then enlarge back (BOX upscaling = nearest).

    PIL resamples 8-bit images horizontally, then vertically, rounding to 8 bits after each
    pass; we do the same, so results equal PIL's (Pillow 13) on 8-bit images up to twice as tall
    as wide (every size tested; CIFAR and ImageNet are square). On taller ones PIL sometimes
    takes the vertical pass first, and a few pixels then differ by one level.
    """
    _, _, h, w = x.shape
    sh, sw = max(int(h * factor), 1), max(int(w * factor), 1)
    return _box_up(_box_down_pil(x, sh, sw, transpose=x.device.type == "cpu"), h, w)


def _box_down_pil(x: torch.Tensor, height: int, width: int, transpose: bool) -> torch.Tensor:
    """PIL's 8-bit BOX downscaling to (height, width): horizontal pass, then vertical.

    transpose: run the horizontal pass on a transposed copy, gathering rows instead of columns
    (~10x faster on CPU; on GPUs the copy costs more than it saves). Same values either way.
    """
    if transpose:
        narrow = _box_down_8bit(x.transpose(-1, -2).contiguous(), width, dim=-2).transpose(-1, -2)
    else:
        narrow = _box_down_8bit(x, width, dim=-1)
    return _box_down_8bit(narrow.contiguous(), height, dim=-2)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to 8-bit values, rounding to nearest (the inverse of / 255)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def jpeg_roundtrip_cpu(x: torch.Tensor, quality: int, workers: int) -> torch.Tensor:
    """JPEG-encode and decode (B, 3, H, W) [0, 1] float CPU images with libjpeg, in `workers`
    threads over chunks of the batch (libjpeg and the tensor ops release the GIL).

    Each image goes float -> uint8 -> JPEG -> uint8 -> float inside its thread, so the
    conversions, which cost as much as the codec at 224 px, run in parallel too.
    """
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    out = torch.empty_like(x)

    def run(start: int, stop: int) -> None:
        encoded = encode_jpeg(list(to_uint8(x[start:stop]).unbind(0)), quality=quality)
        # The decoder returns (3, H, W) views of interleaved pixels: one copy each straight
        # into the float output, then one division (7x faster than dividing the uint8 stack).
        for n, image in enumerate(decode_jpeg(encoded, mode=ImageReadMode.RGB), start):
            out[n].copy_(image)
        out[start:stop].div_(255.0)

    bounds = [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(len(x)).chunk(max(1, workers))]
    if len(bounds) <= 1:
        run(0, len(x))
        return out
    with ThreadPoolExecutor(len(bounds)) as pool:
        for done in [pool.submit(run, a, b) for a, b in bounds]:
            done.result()
    return out


def jpeg_compression(x: torch.Tensor, quality: int, gen: torch.Generator) -> torch.Tensor:
    """Encode every image as a JPEG at `quality` and decode it (libjpeg on CPU, nvJPEG on CUDA).

    Same codec and settings as PIL's save(quality=q) / open (4:2:0, baseline): the bytes match
    the reference's. Off CUDA the codec runs per image in torch.get_num_threads() threads.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if x.device.type != "cuda":
        workers = max(1, torch.get_num_threads())
        return jpeg_roundtrip_cpu(x.cpu(), int(quality), workers).to(x.device)
    encoded = encode_jpeg(list(to_uint8(x).unbind(0)), quality=int(quality))
    # nvJPEG encodes on the GPU but decodes from host memory: one copy for the whole batch
    # instead of a synchronising copy per image.
    sizes = [int(e.numel()) for e in encoded]
    encoded = list(torch.cat(encoded).cpu().split(sizes))
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=x.device)
    return torch.stack(decoded).to(x.dtype).div_(255.0)
