"""Supervised prompt tuning: cross-entropy on labelled images, backbone frozen.

The trainer only sees ``logits = model(images)`` and the model's trainable parameters, so every
prompt family (pixel, token, text, a linear head, or several together) trains through it.
Mixed precision, gradient clipping, warm-up + cosine schedule, and a resumable checkpoint after
every epoch: a killed run, started again with the same inputs, continues from its last
checkpoint and ends bit-identical to an uninterrupted run (model, optimiser, schedule, data
order and every RNG state are restored).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vpt_robust.config import TrainConfig
from vpt_robust.methods.optim import autocast_dtype, cosine_with_warmup, make_optimizer
from vpt_robust.metrics import as_float_images
from vpt_robust.models.classifier import PromptedClassifier
from vpt_robust.utils import progress

__all__ = [
    "FrozenBackboneError",
    "assert_backbone_frozen",
    "autocast_dtype",
    "cosine_with_warmup",
    "make_optimizer",
    "train_prompt",
]

CHECKPOINT_VERSION = 1


class FrozenBackboneError(RuntimeError):
    """A gradient reached the frozen backbone."""


def assert_backbone_frozen(model: PromptedClassifier) -> None:
    leaked = [
        n for n, p in model.backbone.named_parameters() if p.requires_grad or p.grad is not None
    ]
    if leaked:
        raise FrozenBackboneError(f"backbone parameters received gradients: {leaked[:5]}")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(obj: Any) -> Any:
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list | tuple) else obj


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to exactly this run, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: start afresh rather than fail the run
        return None
    if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
        return None
    return state


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
    checkpoint: str | Path | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Learn the model's prompts (and linear head, if any) on ``images``/``labels``.

    ``amp_dtype``: autocast dtype (None: full precision; see ``autocast_dtype``). ``on_step``
    is called after every epoch with the epoch's metrics. ``checkpoint``: file for the
    per-epoch resumable checkpoint (``cfg.checkpoint``); with ``cfg.resume`` a checkpoint of
    the same run (same config, seed, data, initial prompt, and the caller's ``fingerprint``,
    e.g. backbone identity and class names) is resumed, any other is ignored and overwritten.
    The checkpoint is deleted once training completes. Returns a summary (final loss,
    last-epoch training accuracy, steps, seconds, epochs restored from a checkpoint).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} training images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no training images")
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has nothing to train: no prompt or head parameters")
    model.to(device).train()
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, cfg.warmup_steps)
    )
    gen = torch.Generator().manual_seed(seed)
    ckpt_path = Path(checkpoint) if checkpoint is not None and cfg.checkpoint else None
    run_id = ""
    start_epoch, step, restored = 0, 0, 0
    last = {"train_loss": float("nan"), "train_acc": float("nan")}
    if ckpt_path is not None:
        run_id = _digest(
            cfg.model_dump(exclude={"resume", "checkpoint", "seeds"}),
            seed,
            str(amp_dtype),
            dict(fingerprint or {}),
            labels,
            images,
            *[model.learned_state()[k] for k in sorted(model.learned_state())],
        )
        state = _load_checkpoint(ckpt_path, run_id) if cfg.resume else None
        if state is not None:
            model.load_learned_state({k: v.to(device) for k, v in state["learned"].items()})
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["data_order"])
            _set_rng_state(state["rng"], device)
            start_epoch = restored = int(state["epoch"]) + 1
            step = int(state["step"])
            last = dict(state["last"])
    data = images.to(device) if device.type != "cpu" else images
    targets = labels.to(device)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for epoch in progress(
        range(start_epoch, cfg.epochs), desc="train prompt", total=cfg.epochs - start_epoch
    ):
        order = torch.randperm(len(images), generator=gen)
        loss_sum.zero_()
        correct.zero_()
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i : i + cfg.batch_size].to(data.device)
            x = as_float_images(data[idx])
            y = targets[idx.to(targets.device)]
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
            correct += (logits.detach().argmax(-1) == y).sum()
            step += 1
        last = {
            "train_loss": float(loss_sum) / len(images),
            "train_acc": float(correct) / len(images),
        }
        if ckpt_path is not None:
            _save_checkpoint(
                ckpt_path,
                {
                    "version": CHECKPOINT_VERSION,
                    "fingerprint": run_id,
                    "epoch": epoch,
                    "step": step,
                    "learned": {k: v.cpu() for k, v in model.learned_state().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data_order": gen.get_state(),
                    "rng": _rng_state(device),
                    "last": last,
                },
            )
        if on_step is not None:
            on_step(step, {**last, "lr": scheduler.get_last_lr()[0], "epoch": epoch})
    model.eval()
    if ckpt_path is not None:
        ckpt_path.unlink(missing_ok=True)
    return {
        "final_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "steps": float(step),
        "seconds": time.perf_counter() - start,
        "resumed_epochs": float(restored),
    }
