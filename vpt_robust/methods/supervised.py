"""Supervised prompt tuning on labelled images, backbone frozen.

The trainer only sees the model's trainable parameters and an objective
``(model, images, labels) -> (loss, logits, aux)`` (``methods/objectives.py``; cross-entropy on
``model(images)`` by default), so every prompt family (pixel, token, text, a linear head, or
several together) trains through it, and so do methods that train differently: an inner
adversarial attack (TeCoA), an auxiliary loss and masked logits (L2P). Mixed precision,
gradient clipping, per-prefix learning-rate scales (``train.param_groups``), warm-up + cosine or
constant schedule, and a resumable checkpoint after every epoch: a killed run, started again
with the same inputs, continues from its last checkpoint and ends bit-identical to an
uninterrupted run (model, optimiser, schedule, data order, every RNG state and a stateful
objective's state are restored).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpt_robust.config import TrainConfig
from vpt_robust.methods.objectives import (
    Objective,
    ObjectiveOutput,
    cross_entropy_objective,
    objective_identity,
)
from vpt_robust.methods.optim import (
    autocast_dtype,
    constant_with_warmup,
    cosine_with_warmup,
    lr_lambda,
    make_optimizer,
)
from vpt_robust.metrics import as_float_images
from vpt_robust.models.classifier import PromptedClassifier
from vpt_robust.utils import progress

__all__ = [
    "FrozenBackboneError",
    "assert_backbone_frozen",
    "Objective",
    "autocast_dtype",
    "constant_with_warmup",
    "cosine_with_warmup",
    "cross_entropy_objective",
    "make_optimizer",
    "train_prompt",
]

CHECKPOINT_VERSION = 2


class FrozenBackboneError(RuntimeError):
    """A gradient reached the frozen backbone."""


def assert_backbone_frozen(model: PromptedClassifier, *, image_tower: bool = False) -> None:
    """Raise FrozenBackboneError if a backbone weight trains or got a gradient; with
    ``image_tower=True`` (TeCoA fine-tuning only, ``train_prompt(..., finetune=True)``) the image
    tower's weights may, every other backbone weight (text tower, logit scale) still may not."""
    allowed = {id(p) for p in model.backbone.image_model.parameters()} if image_tower else set()
    leaked = [
        n
        for n, p in model.backbone.named_parameters()
        if (p.requires_grad or p.grad is not None) and id(p) not in allowed
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


_RESERVED_AUX = frozenset({"loss", "acc"})
_AUX_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class _EpochMeter:
    """The epoch's summed loss, correct predictions and auxiliary metrics, weighted by batch
    size and kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.aux: dict[str, list[Any]] = {}

    def add(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        aux: Mapping[str, torch.Tensor | float],
    ) -> None:
        n = len(labels)
        self.n += n
        self.loss += loss.detach().float() * n
        self.correct += (logits.detach().argmax(-1) == labels).sum()
        for name, value in aux.items():
            v = torch.as_tensor(value).detach().to(self.device, torch.float32).reshape(())
            total = self.aux.setdefault(name, [torch.zeros((), device=self.device), 0])
            total[0] += v * n
            total[1] += n

    def result(self) -> dict[str, float]:
        out = {"train_loss": float(self.loss) / self.n, "train_acc": float(self.correct) / self.n}
        out.update({f"train_{k}": float(v) / n for k, (v, n) in sorted(self.aux.items())})
        return out


def _checked(out: Any, batch: int) -> ObjectiveOutput:
    """The objective's ``(loss, logits, aux)``, or a clear error naming what is wrong."""
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"objective: expected a (loss, logits, aux) tuple, got {type(out).__name__}"
        )
    loss, logits, aux = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"objective: loss must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError("objective: loss has no graph to the trainable parameters")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"objective: logits must have shape ({batch}, C), got {shape}")
    if not isinstance(aux, Mapping):
        raise TypeError(f"objective: aux must be a mapping, got {type(aux).__name__}")
    for name, value in aux.items():
        if not isinstance(name, str) or not _AUX_NAME.match(name) or name in _RESERVED_AUX:
            raise ValueError(
                f"objective: aux metric name {name!r} must be an identifier other than "
                f"{sorted(_RESERVED_AUX)} (it is reported as train_<name>)"
            )
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(
                f"objective: aux metric {name!r} must be a scalar, got {tuple(value.shape)}"
            )
        if not isinstance(value, torch.Tensor | float | int):
            raise TypeError(f"objective: aux metric {name!r} is a {type(value).__name__}")
    return loss, logits, aux


def _stateful(objective: Any) -> bool:
    return callable(getattr(objective, "state_dict", None)) and callable(
        getattr(objective, "load_state_dict", None)
    )


def _run_id(
    model: PromptedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    amp_dtype: torch.dtype | None,
    fingerprint: Mapping[str, Any] | None,
    objective: Any,
) -> str:
    """Digest of everything that determines the run: a checkpoint resumes only the same run."""
    learned = model.learned_state()
    return _digest(
        cfg.model_dump(exclude={"resume", "checkpoint", "seeds"}),
        seed,
        str(amp_dtype),
        dict(fingerprint or {}),
        objective_identity(objective),
        labels,
        images,
        *[learned[k] for k in sorted(learned)],
    )


@dataclass
class _Run:
    """The mutable state of one training run: what a checkpoint saves and restores."""

    model: PromptedClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_order: torch.Generator
    objective: Any
    device: torch.device
    finetune: bool = False
    epoch: int = 0  # the next epoch to run
    step: int = 0
    last: dict[str, float] = field(
        default_factory=lambda: {"train_loss": float("nan"), "train_acc": float("nan")}
    )

    def state(self, run_id: str) -> dict[str, Any]:
        out = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": run_id,
            "epoch": self.epoch - 1,
            "step": self.step,
            "learned": {k: v.cpu() for k, v in self.model.learned_state().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_order": self.data_order.get_state(),
            "rng": _rng_state(self.device),
            "last": self.last,
        }
        if _stateful(self.objective):
            out["objective"] = self.objective.state_dict()
        return out

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_learned_state({k: v.to(self.device) for k, v in state["learned"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_order.set_state(state["data_order"])
        _set_rng_state(state["rng"], self.device)
        if _stateful(self.objective):
            self.objective.load_state_dict(state["objective"])
        self.epoch = int(state["epoch"]) + 1
        self.step = int(state["step"])
        self.last = dict(state["last"])


def _train_epoch(
    run: _Run,
    data: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    meter: _EpochMeter,
) -> dict[str, float]:
    """One pass over the data in a fresh random order; returns the epoch's metrics."""
    model, optimizer = run.model, run.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    order = torch.randperm(len(data), generator=run.data_order)
    meter.reset()
    for i in range(0, len(data), cfg.batch_size):
        idx = order[i : i + cfg.batch_size].to(data.device)
        x = as_float_images(data[idx])
        y = targets[idx.to(targets.device)]
        with torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, logits, aux = _checked(run.objective(model, x, y), len(y))
        if not model.training:
            raise RuntimeError(
                "objective: left the model in eval mode; run an inner attack inside "
                "`with vpt_robust.methods.objectives.eval_mode(model):`"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.step == 0:
            assert_backbone_frozen(model, image_tower=run.finetune)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        run.scheduler.step()
        meter.add(loss, logits, y, aux)
        run.step += 1
    return meter.result()


def _trainable(
    model: PromptedClassifier, images: torch.Tensor, labels: torch.Tensor, finetune: bool
) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters train_prompt optimises, after checking the data and the model."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} training images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no training images")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if finetune and not any(p.requires_grad for p in model.backbone.image_model.parameters()):
        raise ValueError(
            "finetune=True but the image tower has no trainable weights: build the model with "
            "vpt_robust.methods.tecoa.finetune_classifier"
        )
    if not named:
        raise ValueError("the model has nothing to train: no prompt or head parameters")
    return named


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
    objective: Objective | None = None,
    finetune: bool = False,
) -> dict[str, float]:
    """Learn the model's prompts (and linear head, if any) on ``images``/``labels``.

    ``objective``: ``(model, images, labels) -> (loss, logits, aux)`` minimised on every batch
    (``methods/objectives.py``; default ``cross_entropy_objective``). ``amp_dtype``: autocast
    dtype for the objective (None: full precision; see ``autocast_dtype``). ``on_step`` is called
    after every epoch with the epoch's metrics: ``train_loss``, ``train_acc`` (on the logits the
    objective returns), ``train_<name>`` per aux metric (epoch means), ``lr`` (of the first
    parameter group), ``epoch``. ``checkpoint``: file for the per-epoch resumable checkpoint
    (``cfg.checkpoint``); with ``cfg.resume`` a checkpoint of the same run (same config, seed,
    data, initial prompt, objective identity, and the caller's ``fingerprint``, e.g. backbone
    identity and class names) is resumed, any other is ignored and overwritten. The checkpoint
    is deleted once training completes. Returns a summary: ``final_loss``, ``train_acc`` and
    the ``train_<name>`` aux means of the last epoch, ``steps``, ``seconds``, and
    ``resumed_epochs`` (epochs restored from a checkpoint). ``finetune=True`` (TeCoA's fine-tune
    baseline only) lets the image tower's weights train, when the model was built for it
    (``methods.tecoa.finetune_classifier``); otherwise any backbone weight that trains is an error.
    """
    named = _trainable(model, images, labels, finetune)
    objective = cross_entropy_objective if objective is None else objective
    model.to(device).train()
    optimizer = make_optimizer(named, cfg)
    total = cfg.epochs * -(-len(images) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule, total, cfg.warmup_steps)
    )
    gen = torch.Generator().manual_seed(seed)
    run = _Run(model, optimizer, scheduler, gen, objective, device, finetune=finetune)
    ckpt_path = Path(checkpoint) if checkpoint is not None and cfg.checkpoint else None
    run_id = ""
    if ckpt_path is not None:
        run_id = _run_id(model, images, labels, cfg, seed, amp_dtype, fingerprint, objective)
        state = _load_checkpoint(ckpt_path, run_id) if cfg.resume else None
        if state is not None:
            run.restore(state)
    restored = run.epoch
    data = images.to(device) if device.type != "cpu" else images
    targets = labels.to(device)
    start = time.perf_counter()
    meter = _EpochMeter(device)
    for epoch in progress(
        range(run.epoch, cfg.epochs), desc="train prompt", total=cfg.epochs - run.epoch
    ):
        run.last = _train_epoch(run, data, targets, cfg, amp_dtype, meter)
        run.epoch = epoch + 1
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, run.state(run_id))
        if on_step is not None:
            on_step(run.step, {**run.last, "lr": scheduler.get_last_lr()[0], "epoch": epoch})
    model.eval()
    if ckpt_path is not None:
        ckpt_path.unlink(missing_ok=True)
    last = run.last
    extra = {k: v for k, v in last.items() if k not in ("train_loss", "train_acc")}
    return {
        "final_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        **extra,
        "steps": float(run.step),
        "seconds": time.perf_counter() - start,
        "resumed_epochs": float(restored),
    }
