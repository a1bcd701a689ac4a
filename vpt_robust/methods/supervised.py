"""Supervised prompt tuning: cross-entropy on labelled images, backbone frozen."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vpt_robust.config import TrainConfig
from vpt_robust.metrics import as_float_images
from vpt_robust.models.classifier import PromptedClassifier
from vpt_robust.utils import progress


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class FrozenBackboneError(RuntimeError):
    """A gradient reached the frozen backbone."""


def assert_backbone_frozen(model: PromptedClassifier) -> None:
    leaked = [
        n for n, p in model.backbone.named_parameters() if p.requires_grad or p.grad is not None
    ]
    if leaked:
        raise FrozenBackboneError(f"backbone parameters received gradients: {leaked[:5]}")


def train_prompt(
    model: PromptedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    amp_dtype: torch.dtype | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Learn the model's prompts (and linear head, if any) on ``images``/``labels``.

    Returns a summary (final loss, last-epoch training accuracy, steps, seconds).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} training images but {len(labels)} labels")
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has nothing to train: no prompt or head parameters")
    model.to(device).train()
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, cfg.warmup_steps)
    )
    gen = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for epoch in progress(range(cfg.epochs), desc="train prompt", total=cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        loss_sum.zero_()
        correct.zero_()
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = as_float_images(images[idx].to(device))
            y = labels[idx].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                assert_backbone_frozen(model)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(-1) == y).sum()
            step += 1
        epoch_loss = float(loss_sum) / len(images)
        epoch_acc = float(correct) / len(images)
        if on_step is not None:
            on_step(
                step,
                {
                    "train_loss": epoch_loss,
                    "train_acc": epoch_acc,
                    "lr": scheduler.get_last_lr()[0],
                    "epoch": epoch,
                },
            )
    model.eval()
    return {
        "final_loss": epoch_loss,
        "train_acc": epoch_acc,
        "steps": float(step),
        "seconds": time.perf_counter() - start,
    }
