"""Accuracy and summary statistics shared by the stages."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [0,1]; float input is returned as float32."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Predicted class per image, computed in batches on ``device``."""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        x = as_float_images(images[i : i + batch_size].to(device))
        preds.append(model(x).argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> float:
    """Top-1 accuracy in [0, 1]."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    device = device or next(model.parameters()).device
    return float(
        (predict(model, images, batch_size=batch_size, device=device) == labels.cpu())
        .float()
        .mean()
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
