"""The embedded default data set: rendered shapes in several styles, a caption per image.

It needs no download (backgrounds are the photographs scikit-image ships) and is a pure function
of ``(seed, image_size, per_class_style)``: materialising twice gives byte-identical files, so
DVC can version the directory by its md5. Styles act as domains: the tiny CLIP is pretrained on
``PRETRAIN_STYLES`` only, and prompts are trained and evaluated on ``HELDOUT_STYLES``, a domain
shift the frozen model has never seen (a prompt trained on the pretraining distribution itself
adds nothing measurable).

On disk (``root``): ``images.npy`` (uint8 N,H,W,3), ``labels.npy`` and ``styles.npy`` (int64 N),
``captions.json`` (N strings) and ``meta.json`` (names, splits, seed, size, generator version).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vpt_robust.data.render import (
    CLASS_NAMES,
    COLOR_NAMES,
    GENERATOR_VERSION,
    STYLE_NAMES,
    STYLE_NOUNS,
    render_group,
)

__all__ = [
    "CLASS_NAMES",
    "COLOR_NAMES",
    "DATA_FILES",
    "DEFAULT_PER_CLASS_STYLE",
    "HELDOUT_STYLES",
    "PRETRAIN_STYLES",
    "STYLE_NAMES",
    "EmbeddedData",
    "EmbeddedDataError",
    "load_embedded",
    "materialize",
    "train_test_split",
]

PRETRAIN_STYLES: tuple[str, ...] = ("photo", "flat", "sketch")
HELDOUT_STYLES: tuple[str, ...] = ("neon", "night")
DEFAULT_PER_CLASS_STYLE = 300
DATA_FILES: tuple[str, ...] = (
    "images.npy",
    "labels.npy",
    "styles.npy",
    "captions.json",
    "meta.json",
)
# A quarter of the captions leave the colour out, so that class-only prompts such as
# "a photo of a star" (the zero-shot templates) are in the pretraining distribution.
_NO_COLOR_FRACTION = 0.25

assert set(PRETRAIN_STYLES) | set(HELDOUT_STYLES) == set(STYLE_NAMES)
assert not set(PRETRAIN_STYLES) & set(HELDOUT_STYLES)


class EmbeddedDataError(ValueError):
    """The embedded data directory is missing a file or its files do not agree."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(style: str, class_name: str, color: str | None) -> str:
    """The caption of one image, e.g. ``"a sketch of a red star"`` or ``"an icon of a star"``."""
    noun = STYLE_NOUNS[style]
    obj = f"{color} {class_name}" if color else class_name
    return f"{_article(noun)} {noun} of {_article(obj)} {obj}"


@dataclass
class EmbeddedData:
    """Images (uint8 N,3,H,W), labels, style ids and captions, with the names they refer to."""

    images: torch.Tensor
    labels: torch.Tensor
    styles: torch.Tensor
    captions: list[str]
    class_names: tuple[str, ...] = CLASS_NAMES
    style_names: tuple[str, ...] = STYLE_NAMES
    pretrain_styles: tuple[str, ...] = PRETRAIN_STYLES
    heldout_styles: tuple[str, ...] = HELDOUT_STYLES
    meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise EmbeddedDataError(
                f"images: expected uint8 (N,3,H,W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        for name, value in (("labels", self.labels), ("styles", self.styles)):
            if value.shape != (n,):
                raise EmbeddedDataError(f"{name}: expected shape ({n},), got {tuple(value.shape)}")
        if len(self.captions) != n:
            raise EmbeddedDataError(f"captions: expected {n} entries, got {len(self.captions)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, mask_or_indices: torch.Tensor | np.ndarray | Sequence[int]) -> EmbeddedData:
        """The images selected by a boolean mask (length N) or by integer indices."""
        idx = torch.as_tensor(mask_or_indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise EmbeddedDataError(
                    f"mask_or_indices: boolean mask of shape {tuple(idx.shape)} for {len(self)} images"
                )
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise EmbeddedDataError(f"mask_or_indices: index out of range for {len(self)} images")
        return EmbeddedData(
            images=self.images[idx],
            labels=self.labels[idx],
            styles=self.styles[idx],
            captions=[self.captions[i] for i in idx.tolist()],
            class_names=self.class_names,
            style_names=self.style_names,
            pretrain_styles=self.pretrain_styles,
            heldout_styles=self.heldout_styles,
            meta=self.meta,
        )

    def style_mask(self, styles: str | Sequence[str]) -> torch.Tensor:
        """Boolean mask of the images rendered in any of the named styles."""
        names = [styles] if isinstance(styles, str) else list(styles)
        unknown = [s for s in names if s not in self.style_names]
        if unknown:
            raise EmbeddedDataError(f"styles: unknown {unknown}; known: {list(self.style_names)}")
        ids = torch.tensor([self.style_names.index(s) for s in names])
        return torch.isin(self.styles, ids)

    def class_mask(self, class_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Boolean mask of the images whose label is one of ``class_ids``."""
        return torch.isin(self.labels, torch.as_tensor(class_ids, dtype=torch.long))

    def to_float(self) -> torch.Tensor:
        """The images as float32 in [0, 1], (N,3,H,W)."""
        return self.images.float().div_(255.0)


def _render_all(seed: int, image_size: int, per_class_style: int) -> tuple[np.ndarray, ...]:
    n = len(STYLE_NAMES) * len(CLASS_NAMES) * per_class_style
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    styles = np.empty(n, dtype=np.int64)
    captions: list[str] = []
    i = 0
    for s, style in enumerate(STYLE_NAMES):
        for c, name in enumerate(CLASS_NAMES):
            imgs, colors = render_group(seed, s, c, per_class_style, image_size)
            rng = np.random.default_rng([seed, GENERATOR_VERSION, s, c, 1])
            keep_color = rng.random(per_class_style) >= _NO_COLOR_FRACTION
            images[i : i + per_class_style] = imgs
            labels[i : i + per_class_style] = c
            styles[i : i + per_class_style] = s
            captions += [
                caption(style, name, COLOR_NAMES[k] if keep else None)
                for k, keep in zip(colors.tolist(), keep_color.tolist(), strict=True)
            ]
            i += per_class_style
    return images, labels, styles, np.array(captions, dtype=object)


def materialize(
    root: Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    per_class_style: int = DEFAULT_PER_CLASS_STYLE,
) -> Path:
    """Render the data set into ``root`` and return it.

    Files are written to a temporary sibling directory that then replaces ``root``, so a crash
    never leaves a half-written set. An existing ``root`` is replaced only if it holds nothing
    but the data set's own files (it refuses to delete anything else).
    """
    if image_size < 8:
        raise ValueError(f"image_size: {image_size} is too small (>= 8)")
    if per_class_style < 1:
        raise ValueError(f"per_class_style: {per_class_style} must be >= 1")
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"root: {root} exists and is not a directory")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in DATA_FILES)
        if foreign:
            raise FileExistsError(
                f"root: {root} holds files that are not part of the data set {foreign}; "
                "refusing to replace it"
            )
    images, labels, styles, captions = _render_all(seed, image_size, per_class_style)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "per_class_style": per_class_style,
        "num_images": int(len(labels)),
        "class_names": list(CLASS_NAMES),
        "style_names": list(STYLE_NAMES),
        "pretrain_styles": list(PRETRAIN_STYLES),
        "heldout_styles": list(HELDOUT_STYLES),
        "color_names": list(COLOR_NAMES),
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "styles.npy", styles)
        (tmp / "captions.json").write_text(json.dumps(captions.tolist(), indent=0) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        old = None
        if root.exists():
            old = root.with_name(f".{root.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            root.rename(old)
        tmp.rename(root)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def load_embedded(root: Path) -> EmbeddedData:
    """Load a materialised data set; errors name the missing file or the disagreeing lengths."""
    root = Path(root)
    if not root.is_dir():
        raise EmbeddedDataError(f"embedded data directory not found: {root}")
    missing = [f for f in DATA_FILES if not (root / f).is_file()]
    if missing:
        raise EmbeddedDataError(f"embedded data in {root} is missing {', '.join(missing)}")
    try:
        meta = json.loads((root / "meta.json").read_text())
        captions = json.loads((root / "captions.json").read_text())
    except json.JSONDecodeError as exc:
        raise EmbeddedDataError(f"{root}: unreadable JSON ({exc})") from None
    images = np.load(root / "images.npy")
    labels = np.load(root / "labels.npy")
    styles = np.load(root / "styles.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EmbeddedDataError(
            f"{root / 'images.npy'}: expected uint8 (N,H,W,3), got {images.dtype} {images.shape}"
        )
    lengths = {
        "images.npy": len(images),
        "labels.npy": len(labels),
        "styles.npy": len(styles),
        "captions.json": len(captions),
    }
    if len(set(lengths.values())) != 1:
        raise EmbeddedDataError(f"{root}: files disagree on the number of images: {lengths}")
    class_names = tuple(meta.get("class_names", ()))
    style_names = tuple(meta.get("style_names", ()))
    if not class_names or not style_names:
        raise EmbeddedDataError(f"{root / 'meta.json'}: class_names / style_names missing")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise EmbeddedDataError(f"{root / 'labels.npy'}: labels outside 0..{len(class_names) - 1}")
    if len(styles) and (styles.min() < 0 or styles.max() >= len(style_names)):
        raise EmbeddedDataError(f"{root / 'styles.npy'}: styles outside 0..{len(style_names) - 1}")
    return EmbeddedData(
        images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        labels=torch.from_numpy(labels.astype(np.int64)),
        styles=torch.from_numpy(styles.astype(np.int64)),
        captions=list(captions),
        class_names=class_names,
        style_names=style_names,
        pretrain_styles=tuple(meta.get("pretrain_styles", PRETRAIN_STYLES)),
        heldout_styles=tuple(meta.get("heldout_styles", HELDOUT_STYLES)),
        meta=meta,
    )


def train_test_split(
    data: EmbeddedData, test_fraction: float, seed: int = 0
) -> tuple[EmbeddedData, EmbeddedData]:
    """Split stratified by (style, class): each cell gives ``round(test_fraction * n)`` to test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: {test_fraction} is not in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(data), dtype=torch.bool)
    cell = data.styles * len(data.class_names) + data.labels
    for value in torch.unique(cell).tolist():
        idx = (cell == value).nonzero().flatten()
        k = round(test_fraction * len(idx))
        test[idx[torch.randperm(len(idx), generator=gen)[:k]]] = True
    return data.subset(~test), data.subset(test)
