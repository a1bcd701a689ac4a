"""Optimisers, learning-rate schedule and mixed precision for prompt learning."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from vpt_robust.config import TrainConfig


class NormalizedSGD(torch.optim.Optimizer):
    """Normalised-gradient descent: ``p -= lr * g / ||g||_2`` (EVP, Wu et al. 2022).

    The norm is taken over all parameters of a parameter group together (a prompt stored as
    several tensors moves as one vector), no momentum, no weight decay. Every step therefore
    moves the group by exactly ``lr`` in L2 (unless the gradient is zero), whatever the loss
    scale. UCSC-VLAA/EVP ``main.py`` uses it with lr 70 and a cosine schedule on 224 px.
    """

    def __init__(
        self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, eps: float = 1e-10
    ):
        if lr <= 0:
            raise ValueError(f"lr: {lr} must be > 0")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
            )
            scale = group["lr"] / (norm + group["eps"])
            for p in params:
                p.sub_(p.grad * scale.to(p.dtype))
        return loss


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` over ``params`` (one parameter group)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "normalized_sgd":
        return NormalizedSGD(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: {cfg.optimizer!r} is not one of sgd, adamw, normalized_sgd")


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting: ``auto`` is bf16 on CUDA and off elsewhere,
    ``bf16`` is bf16 anywhere, ``fp32`` is off."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"precision: {precision!r} is not one of auto, bf16, fp32")
