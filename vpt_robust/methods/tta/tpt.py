"""TPT: test-time prompt tuning of CLIP's text context (Shu et al., NeurIPS 2022).

Per test image (episodic): the original and ``n_augmented`` (63) views (random resized crop +
flip, batched and seeded); the ``keep`` (10%) views of lowest prediction entropy are kept (chosen
once, on the first step); ``steps`` (1) AdamW steps (lr 5e-3, torch's default weight decay
0.01, as TPT's code) on the entropy of their averaged probabilities; the prediction is the tuned
model's on the original image; then the context goes back to its start value (``copy_`` under
no_grad) and the optimiser state is dropped. azshue/TPT ``tpt_classification.py`` and the
anchor's ``methods/tpt.py`` (read, not copied).

The model must be a CLIP classifier whose head holds a CoOp context
(``model.head.context.ctx``, ``ContextTextHead``). The context the model holds when the adapter
is built is TPT's start: a classifier built with ``{kind: coop, init: "a photo of a"}`` is TPT
as published; one with a trained CoOp context is TPT + CoOp. Only the context is tuned: the
rest of the model is frozen for the duration of each step (flags restored), gradients are taken
w.r.t. the context alone, so predictions can change only through it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from vpt_robust.methods.tta.augment import random_resized_crop
from vpt_robust.methods.tta.base import (
    Adapter,
    AdapterArgs,
    entropy,
    frozen,
    generator_for,
    register_adapter,
)


class TPTArgs(AdapterArgs):
    n_augmented: int = Field(63, ge=1)
    keep: float = Field(0.1, gt=0, le=1)
    lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    steps: int = Field(1, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0

    @field_validator("crop_scale")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"expected 0 < low <= high <= 1, got {v}")
        return v


def context_parameter(model: nn.Module) -> nn.Parameter:
    ctx = getattr(getattr(getattr(model, "head", None), "context", None), "ctx", None)
    if not isinstance(ctx, nn.Parameter):
        raise ValueError(
            "tpt: the model has no CoOp text context (model.head.context.ctx); build a CLIP "
            "classifier with prompt {kind: coop, init: 'a photo of a'}"
        )
    return ctx


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the views' softmax probabilities (computed in log space)."""
    logp = logits.float().log_softmax(-1)
    avg = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
    avg = avg.clamp_min(torch.finfo(avg.dtype).min)
    return -(avg.exp() * avg).sum()


class TPTAdapter(Adapter):
    """Episodic test-time tuning of the CoOp context, one image at a time (see module doc)."""

    def __init__(self, model: nn.Module, args: TPTArgs) -> None:
        super().__init__(model, args)
        self.ctx = context_parameter(model)
        self._ctx0 = self.ctx.detach().clone()
        self.opt = torch.optim.AdamW([self.ctx], lr=args.lr, weight_decay=args.weight_decay)
        self._opt0 = copy.deepcopy(self.opt.state_dict())
        self.gen = generator_for(self.device, args.seed)

    @contextlib.contextmanager
    def _tuning(self) -> Iterator[None]:
        flag = self.ctx.requires_grad
        with frozen(self.model):
            self.ctx.requires_grad_(True)
            try:
                yield
            finally:
                self.ctx.requires_grad_(flag)

    def _restore(self) -> None:
        with torch.no_grad():
            self.ctx.copy_(self._ctx0)
        self.opt.load_state_dict(copy.deepcopy(self._opt0))

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        a = self.args
        views = torch.cat(
            [image, random_resized_crop(image.expand(a.n_augmented, -1, -1, -1), self.gen,
                                        scale=a.crop_scale)]
        )  # fmt: skip
        n_keep = max(1, int(views.shape[0] * a.keep))
        chosen: torch.Tensor | None = None
        try:
            with self._tuning():
                for _ in range(a.steps):
                    logits = self.forward(self.model, views)
                    if chosen is None:
                        chosen = torch.argsort(entropy(logits.detach()))[:n_keep]
                    loss = average_entropy(logits[chosen])
                    (grad,) = torch.autograd.grad(loss, [self.ctx])
                    self.counts["backward"] += n_keep
                    self.ctx.grad = grad
                    self.opt.step()
                    self.ctx.grad = None
            with frozen(self.model), torch.no_grad():
                return self.forward(self.model, image)
        finally:
            self._restore()

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._one(images[i : i + 1]) for i in range(images.shape[0])])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The model with the start context (TPT's state between images)."""
        with frozen(self.model):
            return self.forward(self.model, images)

    def reset(self) -> None:
        self._restore()
        self.gen.manual_seed(self.args.seed)

    def _state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def _load(self, state: dict[str, Any]) -> None:
        self._restore()
        self.gen.set_state(state["gen"])


@register_adapter("tpt", TPTArgs)
def _tpt(model: nn.Module, args: TPTArgs) -> Adapter:
    return TPTAdapter(model, args)
