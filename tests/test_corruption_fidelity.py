"""Our corruptions against the reference `imagecorruptions` package (ImageNet-C tables).

imagecorruptions 1.1.2 works per image on uint8 HxWx3 arrays and returns np.uint8(result), i.e.
floored values; we floor ours the same way before comparing (rounded for pixelate: PIL rounds).
On current libraries the package needs three compatibility shims, applied here only:
`pkg_resources` (gone from setuptools >= 81) for its frost file paths, `np.float_` (gone from
NumPy 2) for fog, and skimage's removed `multichannel=True` (now channel_axis=-1) for glass blur.
With them its own code runs unchanged, so glass blur and fog are compared against the package
too. Elastic transform is compared against the original ImageNet-C definition (affine warp +
displacement field, written below with OpenCV / scipy / skimage) given the same random draws,
because imagecorruptions replaced that definition by a size-relative variant.

Tolerances (values in [0, 1]):
  deterministic (brightness, contrast, defocus, zoom, pixelate, JPEG): per pixel, at most 1
    level of 255 (the float -> uint8 floor/round boundary), JPEG bit-exact;
  motion blur at a given angle: per pixel 1e-3 of 255; elastic given the draws: mean 2e-3,
    max 0.03 (OpenCV rounds warp positions to 1/32 px);
  random ones, on the same 4 photos: mean |out - clean|, mean and std of the output within
    0.005 (noise), 0.006 (glass), 0.015 (motion, random angle), 0.02 (snow), 0.03 (fog,
    random fractal per image), 0.04 (frost: procedural textures, see frost_textures.py).
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

from vpt_robust.corruptions import CORRUPTIONS, PARAMS, corrupt
from vpt_robust.corruptions.digital import elastic_from_draws
from vpt_robust.corruptions.filters import motion_blur
from vpt_robust.data.images import sample_photos

SIZE = 96


def _pkg_resources_stub() -> types.ModuleType:
    mod = types.ModuleType("pkg_resources")

    def resource_filename(package: str, name: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[package].__file__), name)

    mod.resource_filename = resource_filename  # type: ignore[attr-defined]
    return mod


@pytest.fixture(scope="module")
def ref():
    """imagecorruptions' module, importable and runnable on current NumPy / scikit-image."""
    with pytest.MonkeyPatch.context() as mp:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "pkg_resources", _pkg_resources_stub())
        icc = pytest.importorskip("imagecorruptions.corruptions")
        import skimage.filters

        gaussian = skimage.filters.gaussian

        def gaussian_compat(*args, multichannel=None, **kwargs):
            if multichannel:
                kwargs["channel_axis"] = -1
            return gaussian(*args, **kwargs)

        mp.setattr(icc, "gaussian", gaussian_compat)
        mp.setattr(np, "float_", np.float64, raising=False)
        yield icc


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(SIZE, 4)


def run_ref(ref, imgs: np.ndarray, name: str, severity: int, repeats: int) -> np.ndarray:
    from imagecorruptions import corrupt as ic_corrupt

    np.random.seed(severity)
    return np.stack(
        [
            ic_corrupt(im, corruption_name=name, severity=severity)
            for _ in range(repeats)
            for im in imgs
        ]
    )


def run_ours(
    imgs: np.ndarray, name: str, severity: int, repeats: int, rounding: str = "floor"
) -> np.ndarray:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    outs = [corrupt(x, name, severity, seed=100 + r, table="imagenet") for r in range(repeats)]
    y = torch.cat(outs).permute(0, 2, 3, 1).numpy() * 255.0
    y = np.floor(y + 1e-3) if rounding == "floor" else np.round(y)
    return y.astype(np.uint8)


def stats(out: np.ndarray, clean: np.ndarray) -> np.ndarray:
    o = out.astype(np.float64) / 255.0
    c = np.concatenate([clean] * (len(out) // len(clean))).astype(np.float64) / 255.0
    return np.array([np.abs(o - c).mean(), o.mean(), o.std()])


def test_reference_runs_all_fifteen(ref, photos: np.ndarray) -> None:
    from imagecorruptions import get_corruption_names

    assert tuple(get_corruption_names()) == CORRUPTIONS


@pytest.mark.parametrize(
    ("name", "max_levels", "rounding"),
    [
        ("brightness", 1, "floor"),
        ("contrast", 1, "floor"),
        ("defocus_blur", 1, "floor"),
        ("zoom_blur", 1, "floor"),
        ("pixelate", 0, "round"),
        ("jpeg_compression", 0, "floor"),
    ],
)
def test_deterministic_corruptions_match_per_pixel(
    ref, photos: np.ndarray, name: str, max_levels: int, rounding: str
) -> None:
    for severity in range(1, 6):
        ours = run_ours(photos, name, severity, 1, rounding).astype(int)
        theirs = run_ref(ref, photos, name, severity, 1).astype(int)
        diff = np.abs(ours - theirs)
        assert diff.max() <= max_levels, f"{name} s{severity}: max {diff.max()}"
        assert diff.mean() <= 0.1, f"{name} s{severity}: mean {diff.mean()}"


def test_motion_blur_matches_at_a_given_angle(ref, photos: np.ndarray) -> None:
    img = photos[0]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for radius, sigma in PARAMS["motion_blur"]["imagenet"]:
        for angle in (-44.0, -12.5, 0.0, 30.0):
            theirs = ref._motion_blur(img, radius=radius, sigma=sigma, angle=angle)
            ours = motion_blur(x, radius, sigma, torch.tensor([angle], dtype=torch.float64))
            assert np.abs(ours[0].permute(1, 2, 0).numpy() - theirs).max() < 1e-3
    layer = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    for angle in (-130.0, -90.0, -50.0):  # snow's range: the y-major case
        theirs = ref._motion_blur(layer, radius=12, sigma=8, angle=angle)
        ours = motion_blur(torch.from_numpy(layer)[None, None], 12, 8, torch.tensor([angle]))
        assert np.abs(ours[0, 0].numpy() - theirs).max() < 1e-5


def original_elastic(image: np.ndarray, c: tuple, jitter: np.ndarray, u: np.ndarray) -> np.ndarray:
    """make_imagenet_c.py's elastic_transform with the random draws passed in."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    image = np.array(image, dtype=np.float32) / 255.0
    shape = image.shape
    size = shape[:2]
    centre = np.float32(size) // 2
    half = min(size) // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + (jitter * c[2]).astype(np.float32)
    warp = cv2.getAffineTransform(pts1, pts2)
    image = cv2.warpAffine(image, warp, size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(u[0], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)[..., None]
    dy = (gaussian(u[1], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)[..., None]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    idx = (y + dy).reshape(-1, 1), (x + dx).reshape(-1, 1), z.reshape(-1, 1)
    return np.clip(map_coordinates(image, idx, order=1, mode="reflect").reshape(shape), 0, 1)


@pytest.mark.parametrize(("size", "table"), [(SIZE, "imagenet"), (32, "cifar")])
def test_elastic_matches_original_definition_given_draws(
    photos: np.ndarray, size: int, table: str
) -> None:
    from PIL import Image

    img = np.asarray(Image.fromarray(photos[1]).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    gen = torch.Generator().manual_seed(0)
    for c in PARAMS["elastic_transform"][table]:
        jitter = torch.rand(1, 3, 2, generator=gen) * 2 - 1
        u = torch.rand(1, 2, size, size, generator=gen, dtype=torch.float64) * 2 - 1
        ours = elastic_from_draws(x, c, jitter, u.float())[0].permute(1, 2, 0).numpy()
        theirs = original_elastic(img, c, jitter[0].numpy(), u[0].numpy())
        diff = np.abs(ours - theirs)
        assert diff.mean() < 2e-3 and diff.max() < 0.03, (c, diff.mean(), diff.max())


@pytest.mark.parametrize(
    ("name", "repeats", "tol"),
    [
        ("gaussian_noise", 2, 0.005),
        ("shot_noise", 2, 0.005),
        ("impulse_noise", 2, 0.005),
        ("glass_blur", 2, 0.006),
        ("motion_blur", 6, 0.015),
        ("snow", 4, 0.02),
        ("fog", 12, 0.03),
        ("frost", 6, 0.04),
    ],
)
def test_random_corruptions_match_reference_statistics(
    ref, photos: np.ndarray, name: str, repeats: int, tol: float
) -> None:
    imgs = photos[:, ::2, ::2].copy() if name == "glass_blur" else photos  # its loop is slow
    for severity in range(1, 6):
        ours = stats(run_ours(imgs, name, severity, repeats), imgs)
        theirs = stats(run_ref(ref, imgs, name, severity, repeats), imgs)
        gap = np.abs(ours - theirs)
        assert gap.max() <= tol, (
            f"{name} s{severity}: ours (mad, mean, std) {ours.round(4)}, "
            f"reference {theirs.round(4)}"
        )
