"""Small stream folders and a tiny CLIP checkpoint for the new-domain-stream tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ["circle", "square", "star", "triangle"]
TINY = dict(depth=1, width=32, heads=2, stem_channels=(8, 16, 32), embed_dim=32, text_width=32,
            text_layers=1, text_heads=2)  # fmt: skip


def tiny_checkpoint(path: Path) -> Path:
    """An untrained tiny CLIP (seeded) saved where ``backbone.pretrained`` can point."""
    import torch

    from vpt_robust.models.tiny_clip import build_tiny_clip, save_clip_checkpoint

    torch.manual_seed(0)
    return save_clip_checkpoint(build_tiny_clip(32, **TINY), path)


def make_folder(
    path: Path, n: int = 16, seed: int = 0, labels: str | None = "csv", size: int = 32
) -> Path:
    """``n`` real photos (scikit-image), shifted in colour by ``seed``, as PNGs; labels in a
    ``labels.csv`` (``csv``), as class sub-folders (``folders``) or none (None)."""
    from PIL import Image

    from vpt_robust.data.images import sample_photos

    photos = sample_photos(size, n).astype(np.int16)
    rng = np.random.default_rng(seed)
    photos = np.clip(photos + rng.integers(-40, 40, size=(n, 1, 1, 3)), 0, 255).astype(np.uint8)
    path.mkdir(parents=True)
    rows = ["file,label"]
    for i, img in enumerate(photos):
        label = CLASSES[i % len(CLASSES)]
        target = path / label if labels == "folders" else path
        target.mkdir(exist_ok=True)
        Image.fromarray(img).save(target / f"img_{i:03d}.png")
        rows.append(f"img_{i:03d}.png,{label}")
    if labels == "csv":
        (path / "labels.csv").write_text("\n".join(rows) + "\n")
    return path


def stream_params(root: Path, ckpt: Path, *, tracking: bool = False, **streams: Any) -> dict:
    """A raw params dict with every path under ``root`` and a small stream setup."""
    cfg = {
        "inbox": str(root / "inbox"),
        "store": str(root / "store"),
        "class_names": CLASSES,
        "batch_size": 4,
        "checkpoint_every": 2,
        "attack": {"eps": "1/255", "steps": 2, "n_samples": 4},
        "poll_seconds": 0.5,
        "settle_seconds": 0.5,
        **streams,
    }
    return {
        "paths": {k: str(root / k) for k in ("data", "outputs", "metrics")},
        "backbone": {"source": "embedded", "pretrained": str(ckpt)},
        "streams": cfg,
        "runtime": {"device": "cpu"},
        "tracking": {
            "enabled": tracking,
            "uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifacts": str(root / "mlartifacts"),
        },
    }
