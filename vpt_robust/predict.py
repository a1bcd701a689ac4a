"""`vpt-robust predict --prompt PATH IMAGE_OR_FOLDER`: top-k classes of images under a saved
prompt (the classifier, its backbone and class names are rebuilt from the saved prompt)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from vpt_robust.data.images import list_images, read_images
from vpt_robust.prompts.io import load_prompted_model
from vpt_robust.utils import resolve_device


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), best first


@torch.no_grad()
def predict_images(
    prompt: str | Path,
    inputs: str | Path,
    *,
    top_k: int = 5,
    device: str = "auto",
    batch_size: int = 64,
    checkpoint: str | Path | None = None,
) -> list[Prediction]:
    """Top-``top_k`` classes (softmax probabilities) for the image file or folder ``inputs``.

    ``prompt``: a saved prompt (``.../seed_0``, with or without ``.json`` / ``.safetensors``).
    ``checkpoint``: the backbone checkpoint, if it is no longer where the prompt recorded it.
    """
    if top_k < 1:
        raise ValueError(f"top_k: {top_k} must be >= 1")
    prompt = Path(prompt)
    if prompt.suffix in (".json", ".safetensors"):
        prompt = prompt.with_suffix("")
    dev = resolve_device(device)
    model = load_prompted_model(prompt, dev, checkpoint=checkpoint)
    paths = list_images(inputs)
    names = model.class_names
    k = min(top_k, len(names))
    out: list[Prediction] = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        images = read_images(chunk, size=model.backbone.image_size).to(dev)
        probs = model(images.float() / 255).float().softmax(-1)
        values, indices = probs.topk(k, dim=-1)
        for path, vals, idx in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            out.append(Prediction(path, [(names[j], v) for j, v in zip(idx, vals, strict=True)]))
    return out


def run_predict(
    prompt: str | Path,
    inputs: str | Path,
    *,
    top_k: int = 5,
    device: str = "auto",
    batch_size: int = 64,
    checkpoint: str | Path | None = None,
    out: TextIO | None = None,
) -> int:
    """Print one line per image: ``path<TAB>class (prob) class (prob) ...``; returns 0."""
    out = out or sys.stdout
    for pred in predict_images(
        prompt, inputs, top_k=top_k, device=device, batch_size=batch_size, checkpoint=checkpoint
    ):
        ranked = "  ".join(f"{name} ({100 * p:.1f}%)" for name, p in pred.top)
        print(f"{pred.path}\t{ranked}", file=out)
    return 0
