"""Reading image files for prediction: one file, or every image in a folder (not recursive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is an image file, else the image files in the folder, sorted."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not an image file (known suffixes: {IMAGE_SUFFIXES})")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return found
    raise FileNotFoundError(f"{path}: no such image file or folder")


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor.

    With ``size``: resized so the shorter side is ``size`` (bicubic, antialiased) and centre-
    cropped to ``size`` x ``size``, as CLIP's preprocessing does; a model then sees it at its
    own input size without a lossy downscale inside.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                w, h = img.size
                scale = size / min(w, h)
                img = img.resize(
                    (max(size, round(w * scale)), max(size, round(h * scale))),
                    Image.Resampling.BICUBIC,
                )
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({exc})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_images(paths: list[Path], size: int | None = None) -> torch.Tensor:
    """Several image files as one uint8 (N, 3, size, size) batch (``size`` is required when the
    files differ in size)."""
    images = [read_image(p, size) for p in paths]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size {sorted(shapes)}; pass size= to resize them")
    return torch.stack(images)


SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "colorwheel",
    "retina",
    "hubble_deep_field",
)


def sample_photos(size: int, n: int) -> np.ndarray:
    """n uint8 (size, size, 3) RGB photos that ship with scikit-image, resized (bicubic) and
    cycling over SAMPLE_PHOTOS: real images for tests and benchmarks, offline."""
    import skimage.data
    from PIL import Image

    base = [
        np.asarray(
            Image.fromarray(getattr(skimage.data, name)())
            .convert("RGB")
            .resize((size, size), Image.BICUBIC)
        )
        for name in SAMPLE_PHOTOS[: min(n, len(SAMPLE_PHOTOS))]
    ]
    return np.stack([base[i % len(base)] for i in range(n)])
