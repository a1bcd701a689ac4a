"""Batched image filters shared by the corruptions, written to match the reference libraries.

Each helper reproduces the exact arithmetic of the function the original corruption code calls
(scipy.ndimage / skimage Gaussian filters and their boundary modes, OpenCV's `filter2D`,
`GaussianBlur` and `warpAffine`, scipy's `zoom`, ImageMagick's motion-blur kernel), but on a
whole (B, C, H, W) batch and on any device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# Boundary modes, named as in scipy.ndimage: "nearest" (aaa|abc|ccc), "reflect" (cba|abc|cba,
# scipy's half-sample symmetric), "mirror" (cb|abc|ba, OpenCV's BORDER_REFLECT_101).
BOUNDARY_MODES = ("nearest", "reflect", "mirror")


def boundary_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions (any range) into [0, n) with a scipy-style boundary mode."""
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    if mode not in ("reflect", "mirror"):
        raise ValueError(f"mode: {mode!r} is not one of {BOUNDARY_MODES}")
    if n == 1:
        return torch.zeros_like(idx)
    lo, hi = (int(v) for v in torch.aminmax(idx)) if idx.numel() else (0, 0)
    if mode == "reflect":
        # One reflection suffices (the usual case): i < 0 -> -1 - i, i >= n -> 2n - 1 - i.
        if lo >= -n and hi <= 2 * n - 1:
            j = torch.where(idx < 0, -1 - idx, idx)
            return torch.minimum(j, 2 * n - 1 - j)
        i = torch.remainder(idx, 2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if lo >= -(n - 1) and hi <= 2 * n - 2:
        j = idx.abs()
        return torch.minimum(j, 2 * n - 2 - j)
    i = torch.remainder(idx, 2 * n - 2)
    return torch.where(i >= n, 2 * n - 2 - i, i)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    if sigma <= 0:
        return np.ones(1)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


@lru_cache(maxsize=64)
def _filter_matrix_np(n: int, weights: tuple[float, ...], mode: str) -> np.ndarray:
    radius = (len(weights) - 1) // 2
    rows = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :]
    cols = boundary_index(torch.from_numpy(rows), n, mode).numpy()
    mat = np.zeros((n, n))
    np.add.at(mat, (np.repeat(np.arange(n), len(weights)), cols.ravel()), np.tile(weights, n))
    return mat


def filter_matrix(
    n: int, weights: np.ndarray, mode: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(n, n) matrix M with M @ v = 1-D correlation of v with `weights` under a boundary mode.

    Folding the boundary into a matrix makes kernels wider than the signal exact (scipy
    reflects repeatedly), and turns the filter into one matrix product.
    """
    mat = _filter_matrix_np(n, tuple(float(w) for w in weights), mode)
    return torch.as_tensor(mat, dtype=dtype, device=device)


def separable_filter(
    x: torch.Tensor, weights: np.ndarray, mode: str, method: str = "auto"
) -> torch.Tensor:
    """Filter the last two dims of x with the same symmetric 1-D kernel along each.

    method: "shifts" (a multiply-add per tap on shifted views; fastest on CPU), "matmul" (one
    product with the boundary-folded filter matrix per axis; fastest on GPUs for all but the
    shortest kernels) or "auto". Same result up to float rounding. "auto" avoids "matmul"
    when float32 products may run in reduced precision (TF32).
    """
    if method not in ("auto", "shifts", "matmul"):
        raise ValueError(f"method: {method!r} is not one of 'auto', 'shifts', 'matmul'")
    if len(weights) == 1:
        return x * float(weights[0])
    h, w = x.shape[-2:]
    radius = (len(weights) - 1) // 2
    if method == "auto":
        exact_fp32 = torch.get_float32_matmul_precision() == "highest"
        method = "shifts"
        if radius >= min(h, w) // 2 or (x.device.type != "cpu" and radius > 2 and exact_fp32):
            method = "matmul"
    if method == "matmul":
        mh = filter_matrix(h, weights, mode, x.device, x.dtype)
        mw = filter_matrix(w, weights, mode, x.device, x.dtype)
        return torch.matmul(mh, torch.matmul(x, mw.T))
    y = _correlate_valid(pad_boundary(x, radius, -2, mode), weights, dim=-2)
    return _correlate_valid(pad_boundary(y, radius, -1, mode), weights, dim=-1)


def pad_boundary(x: torch.Tensor, radius: int, dim: int, mode: str) -> torch.Tensor:
    """x extended by `radius` values on both ends of `dim` with a scipy boundary mode.

    Equal to gathering all positions through `boundary_index`, but only the edges are gathered
    and the middle is copied whole (a gather along the last dim was 5x slower on CPU).
    """
    n = x.shape[dim]
    idx = boundary_index(torch.arange(-radius, n + radius, device=x.device), n, mode)
    left, right = x.index_select(dim, idx[:radius]), x.index_select(dim, idx[n + radius :])
    return torch.cat([left, x, right], dim=dim)


def _correlate_valid(x: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """'Valid' 1-D correlation along `dim` as a weighted sum of shifted views.

    For the short kernels used here this beats a 1-channel convolution by a wide margin on CPU.
    """
    k = len(weights)
    n = x.shape[dim] - k + 1
    out = x.narrow(dim, 0, n) * float(weights[0])
    for t in range(1, k):
        out.add_(x.narrow(dim, t, n), alpha=float(weights[t]))
    return out


def gaussian_filter(
    x: torch.Tensor,
    sigma: float,
    mode: str = "nearest",
    truncate: float = 4.0,
    method: str = "auto",
) -> torch.Tensor:
    """skimage.filters.gaussian per channel (scipy.ndimage.gaussian_filter on the two image axes)."""
    return separable_filter(x, gaussian_kernel1d(sigma, truncate), mode, method)


def _cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    x = np.arange(ksize) - (ksize - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


@lru_cache(maxsize=32)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: an aliased disk smoothed by cv2.GaussianBlur (BORDER_REFLECT_101)."""
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = int(radius), 5
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = _cv2_gaussian_kernel(ksize, alias_blur)
    d = torch.from_numpy(disk.astype(np.float64))
    n = d.shape[0]
    idx = boundary_index(torch.arange(-(ksize // 2), n + ksize // 2), n, "mirror")
    gk = torch.from_numpy(g)
    d = F.conv2d(d[idx][:, idx][None, None], gk.view(1, 1, -1, 1))
    d = F.conv2d(d, gk.view(1, 1, 1, -1))[0, 0]
    kernel = d.numpy().astype(np.float32)
    # Drop all-zero outer rows/columns: they change nothing but the cost.
    nz = np.nonzero(np.abs(kernel).sum(0) > 0)[0]
    lo, hi = int(nz.min()), int(nz.max())
    lo = min(lo, kernel.shape[0] - 1 - hi)
    return kernel[lo : kernel.shape[0] - lo, lo : kernel.shape[0] - lo]


def _next_fast_len(n: int) -> int:
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def filter2d_mirror(x: torch.Tensor, kernel: np.ndarray, clamp: bool = False) -> torch.Tensor:
    """cv2.filter2D (correlation, BORDER_REFLECT_101) of every channel with a square kernel.

    Small kernels run as a depthwise convolution; large ones through the FFT, which is what
    OpenCV itself does for kernels of 11 x 11 and more. clamp: clip the result to [0, 1] in
    the same pass that crops it.
    """
    b, c, h, w = x.shape
    k = kernel.shape[0]
    r = k // 2
    kt = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)
    small = k <= 7
    lh, lw = (
        (h + 2 * r, w + 2 * r) if small else (_next_fast_len(h + 2 * r), _next_fast_len(w + 2 * r))
    )
    if r < min(h, w) and max(lh - h - r, lw - w - r) < min(h, w):
        # torch's "reflect" is BORDER_REFLECT_101. Padding straight to the FFT size spares
        # the FFT its own zero-padding copy; kept outputs never read past h + 2r, w + 2r.
        xp = F.pad(x, (r, lw - w - r, r, lh - h - r), mode="reflect")
    else:
        rows = boundary_index(torch.arange(-r, h + r, device=x.device), h, "mirror")
        cols = boundary_index(torch.arange(-r, w + r, device=x.device), w, "mirror")
        xp = x.index_select(2, rows).index_select(3, cols)
    if small:
        out = F.conv2d(xp.reshape(b * c, 1, h + 2 * r, w + 2 * r), kt[None, None])
        out = out.view(b, c, h, w)
        return out.clamp_(0.0, 1.0) if clamp else out
    # Correlation = convolution with the flipped kernel; place its centre at the origin.
    kf = torch.zeros(lh, lw, dtype=x.dtype, device=x.device)
    kf[:k, :k] = kt.flip(0, 1)
    kf = torch.roll(kf, shifts=(-r, -r), dims=(0, 1))
    spec = torch.fft.rfft2(xp, s=(lh, lw)).mul_(torch.fft.rfft2(kf))
    out = torch.fft.irfft2(spec, s=(lh, lw))[..., r : r + h, r : r + w]
    return out.clamp(0.0, 1.0) if clamp else out.contiguous()


def sample_bilinear(img: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Bilinear samples of img (B, C, H, W) at per-image positions coords (B, 2, Ho, Wo), the
    (x, y) of each output pixel in input pixels.

    Matches scipy's map_coordinates (order=1) / OpenCV's remap, which map every out-of-range
    tap through the boundary mode: the linear interpolant of a mirrored ("mirror", about the
    edge pixels) or half-sample symmetric ("reflect", about the edges) sequence is itself
    mirrored about the same points, so reflecting the coordinate instead, as grid_sample does,
    gives the same values ("nearest" = clamping the coordinate). The normalised grid is one
    fused pass over coords, handed to grid_sample as a channels-last view.
    """
    h, w = img.shape[-2:]
    if mode in ("mirror", "nearest"):
        scale, offset = (2.0 / (w - 1), 2.0 / (h - 1)), (-1.0, -1.0)
        padding, corners = ("reflection" if mode == "mirror" else "border"), True
    elif mode == "reflect":
        scale, offset = (2.0 / w, 2.0 / h), (1.0 / w - 1.0, 1.0 / h - 1.0)
        padding, corners = "reflection", False
    else:
        raise ValueError(f"mode: {mode!r} is not one of {BOUNDARY_MODES}")
    shape = (1, 2, 1, 1)
    scale_t = torch.tensor(scale, dtype=img.dtype, device=img.device).view(shape)
    offset_t = torch.tensor(offset, dtype=img.dtype, device=img.device).view(shape)
    grid = torch.addcmul(offset_t, coords.to(img.dtype), scale_t).permute(0, 2, 3, 1)
    if img.device.type == "cpu":
        grid = grid.contiguous()  # the CPU kernel vectorises over contiguous (x, y) pairs only
    return F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=corners)


def sample_bilinear_taps(
    img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str
) -> torch.Tensor:
    """Reference for `sample_bilinear` at positions ys, xs (B, Ho, Wo): the four taps gathered
    and mapped one by one."""
    b, c, h, w = img.shape
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    wy, wx = (ys - y0f).unsqueeze(1), (xs - x0f).unsqueeze(1)
    y0, x0 = y0f.long(), x0f.long()
    y1, x1 = boundary_index(y0 + 1, h, mode), boundary_index(x0 + 1, w, mode)
    y0, x0 = boundary_index(y0, h, mode), boundary_index(x0, w, mode)
    flat = img.reshape(b, c, h * w)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        idx = (yi * w + xi).reshape(b, 1, -1).expand(b, c, -1)
        return flat.gather(2, idx).view(b, c, *ys.shape[1:])

    top = tap(y0, x0) * (1 - wx) + tap(y0, x1) * wx
    bottom = tap(y1, x0) * (1 - wx) + tap(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre by `zoom` and keep the input size (scipy.ndimage.zoom, order 1).

    scipy maps output index i to input i * (n_in - 1) / (n_out - 1) with
    n_out = round(n_in * zoom): that is bilinear interpolation with align_corners=True.
    """
    h, w = x.shape[-2:]
    ch = int(math.ceil(h / zoom))
    cw = int(math.ceil(w / zoom))
    top = (h - ch) // 2
    left = (w - cw) // 2
    oh, ow = int(round(ch * zoom)), int(round(cw * zoom))
    crop = x[..., top : top + ch, left : left + cw]
    lead = x.shape[:-2]
    planes = crop.reshape(-1, 1, ch, cw) if x.dim() != 4 else crop
    if x.device.type != "cpu" and planes.numel() > (ch * cw) ** 2:
        # CUDA's channels-first kernel loops over batch x channels inside each thread (slow
        # for many small images); the channels-last one spreads every value over threads.
        planes = crop.reshape(1, -1, ch, cw).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(planes, size=(oh, ow), mode="bilinear", align_corners=True)
    out = out.reshape(*lead, oh, ow)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return out[..., th : th + h, tw : tw + w]


# Motion blur on CPU switches from per-tap shifts to the FFT from this image side on.
FFT_MIN_SIDE_CPU = 160


def motion_offsets(
    radius: int, sigma: float, angles_deg: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Taps of ImageMagick's motion-blur kernel per image: weights (B, T) and offsets dy, dx.

    Kernel width 2 * radius + 1, one-sided Gaussian weights exp(-i^2 / 2 sigma^2) normalised
    over all taps; tap i sits at -round(i * (sin, cos)(angle)). As in the reference, taps from
    the first one whose offset reaches the image size on are dropped (weights not renormalised).
    """
    width_k = 2 * int(radius) + 1
    i = torch.arange(width_k, dtype=torch.float64, device=angles_deg.device)
    k = torch.exp(-(i**2) / (2 * float(sigma) ** 2)) / (math.sqrt(2 * math.pi) * float(sigma))
    k = k / k.sum()
    rad = torch.deg2rad(angles_deg.to(torch.float64))
    # point = (width sin, width cos), hypot = width: the offsets are i * sin and i * cos.
    py = width_k * torch.sin(rad)
    px = width_k * torch.cos(rad)
    hyp = torch.sqrt(py**2 + px**2)
    dy = -torch.ceil(i[None] * py[:, None] / hyp[:, None] - 0.5).long()
    dx = -torch.ceil(i[None] * px[:, None] / hyp[:, None] - 0.5).long()
    outside = (dy.abs() >= height) | (dx.abs() >= width)
    keep = torch.cumsum(outside.long(), dim=1) == 0
    weights = k[None].expand_as(dy) * keep
    return weights, dy, dx


def motion_extents(taps: int, angle_range: tuple[float, float]) -> tuple[int, int, int, int]:
    """Upper bounds of how far (top, bottom, left, right) `taps` motion-blur taps reach for any
    angle in angle_range (degrees); tap i sits at -round(i * (sin, cos)(angle))."""
    lo, hi = (math.radians(float(a)) for a in angle_range)
    turns = [
        k * math.pi / 2
        for k in range(math.floor(lo / (math.pi / 2)), 1 + math.ceil(hi / (math.pi / 2)))
    ]
    angles = [lo, hi] + [a for a in turns if lo < a < hi]
    sines = [math.sin(a) for a in angles]
    cosines = [math.cos(a) for a in angles]
    far = taps - 1

    def reach(v: float) -> int:  # one more than the largest ceil(far * v - 0.5), v >= 0
        return max(0, math.ceil(far * max(v, 0.0) - 0.5)) + 1

    return reach(-min(sines)), reach(max(sines)), reach(-min(cosines)), reach(max(cosines))


def motion_blur(
    x: torch.Tensor,
    radius: int,
    sigma: float,
    angles_deg: torch.Tensor,
    method: str = "auto",
    clamp: bool = False,
    angle_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Sum of edge-clamped shifted copies of each image, weighted by its motion-blur kernel.

    method: "shifts" (a multiply-add per tap and image), "fft" (one batched FFT convolution)
    or "auto": fft on accelerators and for ImageNet-sized images on CPU, where it measured
    1.7-2.2x faster at 224 px; shifts for small images on CPU. Same result.
    clamp: clip the result to [0, 1] in the same pass that crops it. angle_range: the
    (lo, hi) degrees the angles were drawn from; the padding then follows from it on the host,
    without waiting for the device to report the actual offsets.
    """
    if method == "auto":
        small = x.device.type == "cpu" and min(x.shape[-2:]) < FFT_MIN_SIDE_CPU
        method = "shifts" if small else "fft"
    if method not in ("shifts", "fft"):
        raise ValueError(f"method: {method!r} is not one of 'auto', 'shifts', 'fft'")
    b, c, h, w = x.shape
    weights, dy, dx = motion_offsets(radius, sigma, angles_deg, h, w)
    # out[y, x] = sum_t w_t * x[y - dy_t, x - dx_t]: edge padding only as far as taps reach
    # on each side (motion blur's taps all point one way horizontally, snow's vertically).
    if angle_range is None:
        extents = torch.stack([dy.max(), -dy.min(), dx.max(), -dx.min()]).clamp_min(0).tolist()
    else:
        extents = motion_extents(2 * int(radius) + 1, angle_range)
    top, bottom, left, right = (
        min(int(v), n - 1) for v, n in zip(extents, (h, h, w, w), strict=True)
    )
    if method == "shifts":
        xp = F.pad(x, (left, right, top, bottom), mode="replicate")
        out = torch.zeros_like(x)
        # Per-image strided views: no index tensors, each tap one in-cache multiply-add.
        wl, dyl, dxl = weights.tolist(), dy.tolist(), dx.tolist()
        for n in range(b):
            on, xn = out[n], xp[n]
            for wt, oy, ox in zip(wl[n], dyl[n], dxl[n], strict=True):
                if wt == 0.0:
                    continue
                r0, c0 = top - oy, left - ox
                on.add_(xn[:, r0 : r0 + h, c0 : c0 + w], alpha=wt)
        return out.clamp_(0.0, 1.0) if clamp else out
    # Accelerators: the per-image line kernels as one batched FFT convolution. The image is
    # edge-padded straight to the FFT size; the taps never reach past the padding they need,
    # so the circular convolution is exact on the kept region.
    lh, lw = _next_fast_len(h + top + bottom), _next_fast_len(w + left + right)
    xp = F.pad(x, (left, lw - w - left, top, lh - h - top), mode="replicate")
    kernel = torch.zeros(b, lh * lw, dtype=x.dtype, device=x.device)
    flat_idx = torch.remainder(dy, lh) * lw + torch.remainder(dx, lw)
    kernel.scatter_add_(1, flat_idx, weights.to(x.dtype))
    spec = torch.fft.rfft2(xp).mul_(torch.fft.rfft2(kernel.view(b, 1, lh, lw)))
    full = torch.fft.irfft2(spec, s=(lh, lw))[..., top : top + h, left : left + w]
    return full.clamp(0.0, 1.0) if clamp else full.contiguous()


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's RGB2GRAY weights (ITU-R BT.601) on (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b
