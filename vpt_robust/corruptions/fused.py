"""Fused GPU kernels (Triton) for corruptions that eager PyTorch runs as many small kernels.

Fog's diamond-square fractal takes ~20 kernel launches per level in eager mode, so on a GPU it
is bound by launches, not arithmetic. Here each level is one kernel, and the haze blend is one
more. The eager code in `weather.py` stays the reference: same uniforms in, same map out (up to
float rounding), which the tests check by running these kernels in Triton's interpreter on CPU.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

BLOCK = 1024


_FAILED: str | None = None


def available(device: torch.device) -> bool:
    """True where the fused kernels run natively: Triton installed, a CUDA device of compute
    capability 8.0 or newer (what current Triton releases support), and no earlier failure."""
    if _FAILED or device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def disable(error: BaseException) -> None:
    """Stop using the fused kernels in this process (e.g. Triton cannot build them here)."""
    global _FAILED
    _FAILED = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"fused corruption kernels disabled, using the eager code instead ({_FAILED})",
        RuntimeWarning,
        stacklevel=3,
    )


def _kernels():  # imported lazily: Triton is optional and only used on GPUs
    import triton
    import triton.language as tl

    @triton.jit
    def plasma_level(c_ptr, u_ptr, out_ptr, n, u_stride, total, w2, BLOCK: tl.constexpr):
        # One diamond-square level: corners C (B, n, n) -> map (B, 2n, 2n), toroidal.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        m = 2 * n
        b = offs // (m * m)
        rem = offs % (m * m)
        p = rem // m
        q = rem % m
        i = p // 2
        j = q // 2
        ip = (i + 1) % n
        im = (i + n - 1) % n
        jp = (j + 1) % n
        jm = (j + n - 1) % n
        cb = c_ptr + b * n * n
        ub = u_ptr + b * u_stride
        c00 = tl.load(cb + i * n + j, mask=mask, other=0.0)
        c10 = tl.load(cb + ip * n + j, mask=mask, other=0.0)
        c01 = tl.load(cb + i * n + jp, mask=mask, other=0.0)
        c11 = tl.load(cb + ip * n + jp, mask=mask, other=0.0)
        cm0 = tl.load(cb + im * n + j, mask=mask, other=0.0)
        cm1 = tl.load(cb + im * n + jp, mask=mask, other=0.0)
        c0m = tl.load(cb + i * n + jm, mask=mask, other=0.0)
        c1m = tl.load(cb + ip * n + jm, mask=mask, other=0.0)
        # noise = U * 2 w^2 - w^2, as the eager code computes it
        n_c = tl.load(ub + i * n + j, mask=mask, other=0.0) * (2.0 * w2) - w2
        n_up = tl.load(ub + im * n + j, mask=mask, other=0.0) * (2.0 * w2) - w2
        n_lf = tl.load(ub + i * n + jm, mask=mask, other=0.0) * (2.0 * w2) - w2
        n_l = tl.load(ub + n * n + i * n + j, mask=mask, other=0.0) * (2.0 * w2) - w2
        n_t = tl.load(ub + 2 * n * n + i * n + j, mask=mask, other=0.0) * (2.0 * w2) - w2
        centre = n_c + 0.25 * ((c00 + c10) + (c01 + c11))  # D[i, j]
        centre_up = n_up + 0.25 * ((cm0 + c00) + (cm1 + c01))  # D[i - 1, j]
        centre_left = n_lf + 0.25 * ((c0m + c1m) + (c00 + c10))  # D[i, j - 1]
        left = n_l + 0.25 * (((centre + c00) + centre_up) + c01)  # even row, odd column
        top = n_t + 0.25 * (((centre + c00) + centre_left) + c10)  # odd row, even column
        even_row = (p % 2) == 0
        even_col = (q % 2) == 0
        val = tl.where(even_row, tl.where(even_col, c00, left), tl.where(even_col, top, centre))
        tl.store(out_ptr + offs, val, mask=mask)

    @triton.jit
    def fog_blend(
        x_ptr, map_ptr, lo_ptr, span_ptr, ratio_ptr, out_ptr,
        hw, w, mapsize, total, strength, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # out = clip((x + strength * (map - lo) / span) * ratio), map broadcast over channels.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        b = offs // (3 * hw)
        rem = offs % hw
        y = rem // w
        xq = rem % w
        v = tl.load(x_ptr + offs, mask=mask, other=0.0)
        hz = tl.load(map_ptr + b * mapsize * mapsize + y * mapsize + xq, mask=mask, other=0.0)
        lo = tl.load(lo_ptr + b, mask=mask, other=0.0)
        span = tl.load(span_ptr + b, mask=mask, other=1.0)
        ratio = tl.load(ratio_ptr + b, mask=mask, other=0.0)
        out = (v + strength * ((hz - lo) / span)) * ratio
        tl.store(out_ptr + offs, tl.minimum(tl.maximum(out, 0.0), 1.0), mask=mask)

    return triton, plasma_level, fog_blend


_KERNELS = None


def _get():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernels()
    return _KERNELS


def plasma_map(uniforms: torch.Tensor, mapsize: int, decay: float) -> torch.Tensor:
    """The unnormalised diamond-square map (B, mapsize, mapsize) from (B, mapsize^2 - 1)
    uniforms, consumed level by level as `weather.plasma_from_uniforms` does."""
    triton, plasma_level, _ = _get()
    batch = uniforms.shape[0]
    uniforms = uniforms.contiguous()
    corners = torch.zeros(batch, 1, 1, dtype=torch.float32, device=uniforms.device)
    wibble, offset, n = 100.0, 0, 1
    while n < mapsize:
        out = torch.empty(batch, 2 * n, 2 * n, dtype=torch.float32, device=uniforms.device)
        total = out.numel()
        plasma_level[(triton.cdiv(total, BLOCK),)](
            corners, uniforms[:, offset:], out, n, uniforms.stride(0), total, wibble * wibble,
            BLOCK=BLOCK,
        )  # fmt: skip
        offset += 3 * n * n
        corners, n = out, 2 * n
        wibble /= decay
    return corners


def fog_blend(x: torch.Tensor, plasma: torch.Tensor, strength: float) -> torch.Tensor:
    """clip((x + strength * haze) * max / (max + strength)) per image, haze = the plasma map
    normalised to [0, 1] and cropped to the image; one pass over x."""
    triton, _, blend = _get()
    b, _, h, w = x.shape
    x = x.contiguous()
    plasma = plasma.contiguous()
    lo, hi = torch.aminmax(plasma.view(b, -1), dim=1)
    max_val = x.amax(dim=(1, 2, 3))
    ratio = max_val / (max_val + strength)
    out = torch.empty_like(x)
    total = x.numel()
    blend[(triton.cdiv(total, BLOCK),)](
        x, plasma, lo, hi - lo, ratio, out, h * w, w, plasma.shape[-1], total, float(strength),
        BLOCK=BLOCK,
    )  # fmt: skip
    return out
