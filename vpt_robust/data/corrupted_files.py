"""Loaders for the distributed corrupted test sets: CIFAR-10-C / CIFAR-100-C and ImageNet-C.

CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich): `root/<corruption>.npy` holds uint8 images
(50000, 32, 32, 3) = severities 1..5 stacked, 10,000 each; `root/labels.npy` holds the labels
(50,000 = the 10,000 test labels repeated per severity; a 10,000-long file is accepted too).

ImageNet-C: `root/<corruption>/<severity>/<wnid>/<name>.JPEG`; the class index of a wnid is its
position among the sorted class folders (the torchvision / robustbench convention). An optional
list of "wnid/filename" entries selects and orders images (robustbench evaluates a fixed
5,000-image subset this way).

The sources at the end plug these files into `vpt_robust.corruptions.CorruptionStream`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CIFAR_C_PER_SEVERITY = 10_000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CorruptedFilesError(ValueError):
    """A corrupted-data file or folder is missing or not in the distributed format."""


def _check_severity(severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise CorruptedFilesError(f"severity: expected an int in 1..5, got {severity!r}")


def _open_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise CorruptedFilesError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise CorruptedFilesError(f"{path}: not a readable .npy array ({exc})") from exc


def cifar_c_arrays(
    root: str | Path, corruption: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The whole `<corruption>.npy` (5 x N images, N, H, W, 3 uint8) and `labels.npy`, checked."""
    root = Path(root)
    images = _open_npy(root / f"{corruption}.npy", mmap)
    labels = _open_npy(root / "labels.npy", mmap)
    path = root / f"{corruption}.npy"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CorruptedFilesError(
            f"{path}: expected uint8 images of shape (5 * N, H, W, 3), got {images.dtype} "
            f"{images.shape}"
        )
    if images.shape[0] % 5:
        raise CorruptedFilesError(
            f"{path}: {images.shape[0]} images is not 5 severities of equal size"
        )
    per = images.shape[0] // 5
    if labels.ndim != 1 or labels.shape[0] not in (per, 5 * per):
        raise CorruptedFilesError(
            f"{root / 'labels.npy'}: expected {5 * per} (or {per}) labels, got shape {labels.shape}"
        )
    return images, labels


def load_cifar_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    n_examples: int | None = None,
    as_float: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one corruption at one severity from CIFAR-10-C / CIFAR-100-C files.

    Returns uint8 images (N, H, W, 3) as stored, or with as_float=True float32 (N, 3, H, W)
    in [0, 1] (what robustbench's load_cifar10c returns), and int64 labels (N,). n_examples
    keeps the first n of the severity block (robustbench's choice with shuffle=False).
    """
    _check_severity(severity)
    images, labels = cifar_c_arrays(root, corruption)
    per = images.shape[0] // 5
    n = per if n_examples is None else int(n_examples)
    if not 1 <= n <= per:
        raise CorruptedFilesError(f"n_examples: expected 1..{per}, got {n_examples}")
    start = (severity - 1) * per
    x = torch.from_numpy(np.ascontiguousarray(images[start : start + n]))
    lab = labels[start : start + n] if labels.shape[0] == 5 * per else labels[:n]
    y = torch.from_numpy(np.asarray(lab).astype(np.int64))
    if as_float:
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x, y


def imagenet_c_files(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    image_ids: Sequence[str] | None = None,
) -> tuple[list[Path], list[int], list[str]]:
    """Paths, class indices and the sorted class list (wnids) of one ImageNet-C folder.

    Without image_ids: every image file under root/corruption/severity/<wnid>/, sorted by class
    then file name. With image_ids ("wnid/filename" each): exactly those, in that order.
    """
    _check_severity(severity)
    folder = Path(root) / corruption / str(severity)
    if not folder.is_dir():
        raise CorruptedFilesError(f"{folder}: folder not found")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise CorruptedFilesError(f"{folder}: no class folders")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    targets: list[int] = []
    if image_ids is None:
        for c in classes:
            for f in sorted((folder / c).iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(f)
                    targets.append(class_to_idx[c])
    else:
        for entry in image_ids:
            wnid = entry.strip().split("/")[0]
            if wnid not in class_to_idx:
                raise CorruptedFilesError(f"{folder}: no class folder {wnid!r} for {entry!r}")
            paths.append(folder / entry.strip())
            targets.append(class_to_idx[wnid])
    if not paths:
        raise CorruptedFilesError(f"{folder}: no images found")
    return paths, targets, classes


def read_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB (PIL, as the ImageNet-C loaders do)."""
    from PIL import Image

    if not path.is_file():
        raise CorruptedFilesError(f"{path}: file not found")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _stack_float(arrays: list[np.ndarray], what: str) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CorruptedFilesError(f"{what}: images differ in size {sorted(shapes)}; resize first")
    x = torch.from_numpy(np.stack(arrays))
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def load_imagenet_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    n_examples: int | None = None,
    image_ids: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (N, 3, H, W) in [0, 1] and int64 labels of one ImageNet-C folder."""
    paths, targets, _ = imagenet_c_files(root, corruption, severity, image_ids=image_ids)
    n = len(paths) if n_examples is None else int(n_examples)
    if not 1 <= n <= len(paths):
        raise CorruptedFilesError(f"n_examples: expected 1..{len(paths)}, got {n_examples}")
    x = _stack_float([read_rgb(p) for p in paths[:n]], f"{Path(root) / corruption}")
    return x, torch.tensor(targets[:n], dtype=torch.int64)


class CifarCSource:
    """A `CorruptionSource` over CIFAR-10-C / CIFAR-100-C files (memory-mapped, read on demand)."""

    def __init__(
        self, root: str | Path, *, device: str | torch.device = "cpu", n_examples: int | None = None
    ) -> None:
        self.root = Path(root)
        self.device = torch.device(device)
        files = sorted(p for p in self.root.glob("*.npy") if p.name != "labels.npy")
        if not files:
            raise CorruptedFilesError(f"{self.root}: no <corruption>.npy files")
        images, _ = cifar_c_arrays(self.root, files[0].stem)
        per = images.shape[0] // 5
        if n_examples is not None and not 1 <= int(n_examples) <= per:
            raise CorruptedFilesError(f"n_examples: expected 1..{per}, got {n_examples}")
        self._n = per if n_examples is None else int(n_examples)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._n

    def fetch(
        self, corruption: str, severity: int, indices: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_severity(severity)
        if corruption not in self._arrays:
            self._arrays[corruption] = cifar_c_arrays(self.root, corruption)
        images, labels = self._arrays[corruption]
        per = images.shape[0] // 5
        idx = indices.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= per):
            raise CorruptedFilesError(f"indices: outside 0..{per - 1} for {corruption}")
        rows = (severity - 1) * per + idx
        x = torch.from_numpy(np.ascontiguousarray(images[np.sort(rows)]))
        order = np.argsort(np.argsort(rows))
        x = x[torch.from_numpy(order)]
        lab = labels[rows] if labels.shape[0] == 5 * per else labels[idx]
        y = torch.from_numpy(np.asarray(lab).astype(np.int64))
        x = x.permute(0, 3, 1, 2).to(self.device, torch.float32).div_(255.0)
        return x, y.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "cifar_c_files", "root": str(self.root), "n_samples": self._n}


class ImageNetCSource:
    """A `CorruptionSource` over ImageNet-C folders; images are decoded on demand."""

    def __init__(
        self,
        root: str | Path,
        *,
        device: str | torch.device = "cpu",
        image_ids: Sequence[str] | None = None,
        n_examples: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.device = torch.device(device)
        self.image_ids = list(image_ids) if image_ids is not None else None
        self.n_examples = n_examples
        self._lists: dict[tuple[str, int], tuple[list[Path], list[int]]] = {}
        self._n: int | None = None
        first = (
            sorted(d.name for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        )
        if not first:
            raise CorruptedFilesError(f"{self.root}: no corruption folders")
        sev = sorted(d.name for d in (self.root / first[0]).iterdir() if d.is_dir())
        if not sev:
            raise CorruptedFilesError(f"{self.root / first[0]}: no severity folders")
        paths, _ = self._files(first[0], int(sev[0]))
        self._n = len(paths)

    def _files(self, corruption: str, severity: int) -> tuple[list[Path], list[int]]:
        key = (corruption, severity)
        if key not in self._lists:
            paths, targets, _ = imagenet_c_files(
                self.root, corruption, severity, image_ids=self.image_ids
            )
            n = len(paths) if self.n_examples is None else min(int(self.n_examples), len(paths))
            self._lists[key] = (paths[:n], targets[:n])
        return self._lists[key]

    def __len__(self) -> int:
        assert self._n is not None
        return self._n

    def fetch(
        self, corruption: str, severity: int, indices: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        paths, targets = self._files(corruption, severity)
        idx = [int(i) for i in indices.cpu()]
        if idx and (min(idx) < 0 or max(idx) >= len(paths)):
            raise CorruptedFilesError(f"indices: outside 0..{len(paths) - 1} for {corruption}")
        x = _stack_float([read_rgb(paths[i]) for i in idx], f"{self.root / corruption}")
        y = torch.tensor([targets[i] for i in idx], dtype=torch.int64)
        return x.to(self.device), y.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "imagenet_c_folders",
            "root": str(self.root),
            "n_samples": len(self),
            "image_ids": len(self.image_ids) if self.image_ids is not None else None,
        }
