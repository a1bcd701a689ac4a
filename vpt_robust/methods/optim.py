"""Optimisers, learning-rate schedule and mixed precision for prompt learning."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def param_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]], scales: Mapping[str, float], lr: float
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: every parameter at ``lr * scale`` of the longest prefix in
    ``scales`` that matches its name on whole dotted components (``head`` matches
    ``head.fc.weight``, not ``headx``), ``lr`` when none does. One group per distinct scale, in
    order of first appearance; each group carries its ``prefix`` (None: the default group)."""
    if not named:
        raise ValueError("no parameters to optimise")
    unused = [p for p in scales if not any(_matches(n, p) for n, _ in named)]
    if unused:
        names = sorted({n.rsplit(".", 1)[0] for n, _ in named})
        raise ValueError(
            f"train.param_groups: prefixes {unused} match no trainable parameter "
            f"(trainable: {names})"
        )
    groups: dict[str | None, dict[str, Any]] = {}
    for name, param in named:
        hits = [p for p in scales if _matches(name, p)]
        prefix = max(hits, key=len) if hits else None
        scale = 1.0 if prefix is None else float(scales[prefix])
        group = groups.setdefault(prefix, {"params": [], "lr": lr * scale, "prefix": prefix})
        group["params"].append(param)
    return list(groups.values())


def make_optimizer(
    params: Sequence[torch.nn.Parameter] | Sequence[tuple[str, torch.nn.Parameter]],
    cfg: TrainConfig,
) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer``. ``params``: plain parameters (one group, at
    ``cfg.lr``) or ``(name, parameter)`` pairs, grouped by ``cfg.param_groups`` (see
    ``param_groups``; NormalizedSGD then normalises each group's step on its own)."""
    params = list(params)
    if params and isinstance(params[0], tuple):
        groups: list[Any] = param_groups(params, cfg.param_groups, cfg.lr)
    elif cfg.param_groups:
        raise ValueError("train.param_groups needs named parameters: pass (name, parameter) pairs")
    else:
        groups = params
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "normalized_sgd":
        return NormalizedSGD(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: {cfg.optimizer!r} is not one of sgd, adamw, normalized_sgd")


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def constant_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then 1 (``total`` unused; same signature)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 1.0


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "cosine": cosine_with_warmup,
    "constant": constant_with_warmup,
}


def lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of ``schedule`` (``cosine`` | ``constant``) over ``total`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule: {schedule!r} is not one of {sorted(SCHEDULES)}")
    fn = SCHEDULES[schedule]
    return lambda step: fn(step, total, warmup)


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
