"""Parameter tables of the 15 common corruptions (Hendrycks & Dietterich, ICLR 2019).

Two tables per corruption, one row per severity 1..5, with the numbers of the original
generators in hendrycks/robustness: `make_cifar_c.py` (CIFAR-10-C, 32 px) and
`make_imagenet_c.py` (ImageNet-C, 224 px). Parameters are in pixels of the image the table was
made for; other sizes use the same pixel values (as the `imagecorruptions` package does for all
but elastic_transform, which it replaced by a variant scaled to the image size; ours keeps the
original elastic definition and table, see `digital.elastic_transform`).

Motion blur and snow use the ImageMagick `MotionBlurImage` parameters (radius, sigma); we
implement that kernel directly, like `imagecorruptions` does, instead of calling ImageMagick.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

TABLE_NAMES: tuple[str, ...] = ("cifar", "imagenet")

# Images whose longer side is at most this many pixels get the CIFAR table under table="auto".
AUTO_CIFAR_MAX_SIDE = 64


def _zoom_factors(start: float, stop: float, step: float) -> tuple[float, ...]:
    # np.arange reproduces the exact float values (and count) of the original definition.
    return tuple(float(v) for v in np.arange(start, stop, step))


_IM = 244  # the ImageNet elastic table is written in multiples of 244 ("should have been 224")
_CI = 32

PARAMS: dict[str, dict[str, tuple[Any, ...]]] = {
    # std of the additive normal noise (images in [0, 1])
    "gaussian_noise": {
        "cifar": (0.04, 0.06, 0.08, 0.09, 0.10),
        "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38),
    },
    # photon count scale: Poisson(x * c) / c
    "shot_noise": {
        "cifar": (500, 250, 100, 75, 50),
        "imagenet": (60, 25, 12, 5, 3),
    },
    # salt-and-pepper amount (fraction of values replaced)
    "impulse_noise": {
        "cifar": (0.01, 0.02, 0.03, 0.05, 0.07),
        "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27),
    },
    # (disk radius, anti-alias Gaussian sigma)
    "defocus_blur": {
        "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    },
    # (Gaussian sigma, max pixel displacement, iterations)
    "glass_blur": {
        "cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    },
    # (ImageMagick radius, sigma); angle ~ U(-45, 45) degrees
    "motion_blur": {
        "cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    },
    # zoom factors averaged with the image
    "zoom_blur": {
        "cifar": (
            _zoom_factors(1, 1.06, 0.01),
            _zoom_factors(1, 1.11, 0.01),
            _zoom_factors(1, 1.16, 0.01),
            _zoom_factors(1, 1.21, 0.01),
            _zoom_factors(1, 1.26, 0.01),
        ),
        "imagenet": (
            _zoom_factors(1, 1.11, 0.01),
            _zoom_factors(1, 1.16, 0.01),
            _zoom_factors(1, 1.21, 0.02),
            _zoom_factors(1, 1.26, 0.02),
            _zoom_factors(1, 1.31, 0.03),
        ),
    },
    # (layer mean, layer std, layer zoom, threshold, blur radius, blur sigma, image blend)
    "snow": {
        "cifar": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        "imagenet": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
    },
    # (image weight, frost-texture weight)
    "frost": {
        "cifar": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        "imagenet": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    },
    # (fog strength, plasma-fractal wibble decay)
    "fog": {
        "cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "imagenet": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    },
    # added to the HSV value channel
    "brightness": {
        "cifar": (0.05, 0.1, 0.15, 0.2, 0.3),
        "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
    },
    # factor on the deviation from the per-channel mean
    "contrast": {
        "cifar": (0.75, 0.5, 0.4, 0.3, 0.15),
        "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
    },
    # (displacement scale alpha, displacement smoothing sigma, affine corner jitter), in pixels
    "elastic_transform": {
        "cifar": (
            (_CI * 0, _CI * 0, _CI * 0.08),
            (_CI * 0.05, _CI * 0.2, _CI * 0.07),
            (_CI * 0.08, _CI * 0.06, _CI * 0.06),
            (_CI * 0.1, _CI * 0.04, _CI * 0.05),
            (_CI * 0.1, _CI * 0.03, _CI * 0.03),
        ),
        "imagenet": (
            (_IM * 2, _IM * 0.7, _IM * 0.1),
            (_IM * 2, _IM * 0.08, _IM * 0.2),
            (_IM * 0.05, _IM * 0.01, _IM * 0.02),
            (_IM * 0.07, _IM * 0.01, _IM * 0.02),
            (_IM * 0.12, _IM * 0.01, _IM * 0.02),
        ),
    },
    # downscale factor before upscaling back
    "pixelate": {
        "cifar": (0.95, 0.9, 0.85, 0.75, 0.65),
        "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25),
    },
    # JPEG quality
    "jpeg_compression": {
        "cifar": (80, 65, 58, 50, 40),
        "imagenet": (25, 18, 15, 10, 7),
    },
}


def select_table(height: int, width: int, table: str = "auto") -> str:
    """Pick the parameter table: CIFAR for images up to 64 px on the longer side, else ImageNet.

    64 px is the largest size the small-image tables are used for in practice (CIFAR, 32 px);
    the ImageNet table's pixel parameters (blur radii up to 10 px, displacements up to 4 px) would
    wipe out such images. Pass `table="cifar"` or `"imagenet"` to override.
    """
    if table == "auto":
        return "cifar" if max(height, width) <= AUTO_CIFAR_MAX_SIDE else "imagenet"
    if table not in TABLE_NAMES:
        raise ValueError(f"table: {table!r} is not one of 'auto', {', '.join(TABLE_NAMES)}")
    return table


def params_for(name: str, severity: int, table: str) -> Any:
    """The parameter row of one corruption at one severity (1..5) in one table."""
    return PARAMS[name][table][severity - 1]
