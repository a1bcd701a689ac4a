"""The public entry point: `corrupt(images, name, severity, seed=...)` over a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vpt_robust.corruptions import blur, digital, noise, weather
from vpt_robust.corruptions.tables import CORRUPTIONS, params_for, select_table

CorruptionFn = Callable[[torch.Tensor, Any, torch.Generator, str], torch.Tensor]

_FUNCTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": lambda x, p, g, t: noise.gaussian_noise(x, p, g),
    "shot_noise": lambda x, p, g, t: noise.shot_noise(x, p, g),
    "impulse_noise": lambda x, p, g, t: noise.impulse_noise(x, p, g),
    "defocus_blur": lambda x, p, g, t: blur.defocus_blur(x, p, g),
    "glass_blur": lambda x, p, g, t: blur.glass_blur(x, p, g),
    "motion_blur": lambda x, p, g, t: blur.motion_blur(x, p, g),
    "zoom_blur": lambda x, p, g, t: blur.zoom_blur(x, p, g),
    "snow": lambda x, p, g, t: weather.snow(x, p, g),
    "frost": lambda x, p, g, t: weather.frost(x, p, g, t),
    "fog": lambda x, p, g, t: weather.fog(x, p, g),
    "brightness": lambda x, p, g, t: digital.brightness(x, p, g),
    "contrast": lambda x, p, g, t: digital.contrast(x, p, g),
    "elastic_transform": lambda x, p, g, t: digital.elastic_transform(x, p, g),
    "pixelate": lambda x, p, g, t: digital.pixelate(x, p, g),
    "jpeg_compression": lambda x, p, g, t: digital.jpeg_compression(x, p, g),
}
assert tuple(_FUNCTIONS) == CORRUPTIONS

# On CPU a batch is processed in chunks of at most this many values (24 MiB of float32): glibc
# serves blocks above its mmap ceiling (32 MiB) with fresh pages, page-faulted on every call,
# which costs more than the arithmetic of most corruptions; smaller blocks are recycled. Larger
# chunks than needed for that only add the copy into the output (measured at 224 px, batch 32).
CPU_CHUNK_VALUES = 6 << 20
MIN_SIDE = 16


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device`; seed=None draws its seed from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    return torch.Generator(device=device).manual_seed(seed)


def check_images(images: Any, *, values: bool = True) -> None:
    """Raise a clear error unless images is a (B, 3, H, W) floating tensor in [0, 1].

    values=False skips the range check (a pass over the batch and, on GPUs, a host sync).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"images: expected a floating dtype with values in [0, 1], got {images.dtype}"
        )
    b, _, h, w = images.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"images: height and width must be at least {MIN_SIDE}, got {h}x{w}")
    if b == 0 or not values:
        return
    lo, hi = torch.aminmax(images)
    if not (float(lo) >= 0.0 and float(hi) <= 1.0):
        raise ValueError(f"images: values must lie in [0, 1], got min {float(lo)}, max {float(hi)}")


def check_name_severity(name: Any, severity: Any) -> None:
    """Raise a clear error for an unknown corruption or a severity outside 1..5."""
    if name not in CORRUPTIONS:
        raise ValueError(
            f"name: unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity: expected an int in 1..5, got {severity!r}")


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int | None = None,
    table: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """Apply one of the 15 common corruptions at severity 1..5 to a batch.

    images: (B, 3, H, W) float tensor in [0, 1] on any device; the result has the same shape,
    dtype and device, values in [0, 1]. Computation runs in float32 on the images' device.
    seed: same seed, same input, same device -> same output, on CPU whatever the thread count
    (`draws.py`; CPU and CUDA draw different random numbers). table: "auto" (CIFAR-10-C parameters for images up to 64 px, ImageNet-C above),
    "cifar" or "imagenet". check_values=False skips the [0, 1] check, for callers that
    validated the images once already (streams over a fixed base set do).
    """
    check_name_severity(name, severity)
    check_images(images, values=check_values)
    b, _, h, w = images.shape
    table_name = select_table(h, w, table)
    params = params_for(name, severity, table_name)
    gen = make_generator(seed, images.device)
    fn = _FUNCTIONS[name]
    x = images.to(torch.float32)
    if b == 0:
        return images.clone()
    if images.device.type != "cpu":
        return fn(x, params, gen, table_name).to(images.dtype)
    chunk = max(1, CPU_CHUNK_VALUES // (3 * h * w))
    if chunk >= b:
        return fn(x, params, gen, table_name).to(images.dtype)
    out = torch.empty_like(images)
    for start in range(0, b, chunk):
        out[start : start + chunk] = fn(x[start : start + chunk], params, gen, table_name)
    return out
