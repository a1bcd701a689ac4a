"""The baselines of continual test-time adaptation: source, norm (test-batch statistics), Tent,
CoTTA.

Facts from the papers and the anchor benchmark (mariodoebler/test-time-adaptation,
``methods/tent.py``, ``methods/cotta.py``, ``augmentations/transforms_cotta.py``; read, not
copied). Tent and CoTTA change weights, so they adapt a deep copy of the model: the model passed
in is never written, and ``reset()`` loads the copy's configured start state back.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from vpt_robust.methods.tta.augment import cotta_augment
from vpt_robust.methods.tta.base import (
    Adapter,
    AdapterArgs,
    clone_state,
    entropy,
    frozen,
    generator_for,
    make_optimizer,
    mean_confidence,
    register_adapter,
    soft_cross_entropy,
    use_batch_statistics,
)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class SourceArgs(AdapterArgs):
    pass


class SourceAdapter(Adapter):
    """No adaptation: the model in eval mode (its own flags restored after every call)."""

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.predict(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with frozen(self.model):
            return self.forward(self.model, images)

    def reset(self) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        pass


@register_adapter("source", SourceArgs)
def _source(model: nn.Module, args: SourceArgs) -> Adapter:
    return SourceAdapter(model, args)


class NormAdapter(SourceAdapter):
    """Test-time normalisation (BN adaptation, Schneider et al., NeurIPS 2020): the source model
    with every BatchNorm normalising with the test batch's statistics; nothing is learned.
    Works on a copy: the wrapped model is never written. The reference that separates what a
    method gains from batch statistics alone from what it learns."""

    def __init__(self, model: nn.Module, args: AdapterArgs) -> None:
        model = copy.deepcopy(model)
        if use_batch_statistics(model) == 0:
            raise ValueError(
                "norm: the model has no BatchNorm layer to normalise with batch statistics"
            )
        super().__init__(model, args)


@register_adapter("norm", SourceArgs)
def _norm(model: nn.Module, args: SourceArgs) -> Adapter:
    return NormAdapter(model, args)


class OptimArgs(AdapterArgs):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)


def optimizer_for(params: list[nn.Parameter], a: OptimArgs) -> torch.optim.Optimizer:
    return make_optimizer(
        params, a.optimizer, a.lr, betas=a.betas, momentum=a.momentum, weight_decay=a.weight_decay
    )


def configure_norms(model: nn.Module, *, trainable: Literal["norm", "all"]) -> list[nn.Parameter]:
    """Freeze ``model`` except what the method adapts, and return those parameters.

    Every module goes to eval mode (no dropout noise); every BatchNorm normalises with the
    statistics of the current batch (``track_running_stats=False``, running stats dropped, as
    Tent and CoTTA do). ``trainable="norm"``: only the affine scale and shift of BatchNorm,
    LayerNorm and GroupNorm layers require grad (Tent); ``"all"``: every parameter (CoTTA).
    """
    model.eval()
    model.requires_grad_(False)
    use_batch_statistics(model)
    params: list[nn.Parameter] = []
    for m in model.modules():
        if trainable == "norm" and isinstance(m, NORM_TYPES):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(True)
                    params.append(p)
    if trainable == "all":
        model.requires_grad_(True)
        params = list(model.parameters())
    if not params:
        raise ValueError(
            "the model has no normalisation layer with affine parameters to adapt "
            "(BatchNorm, LayerNorm or GroupNorm)"
        )
    return params


class TentArgs(OptimArgs):
    steps: int = Field(1, ge=1)


class TentAdapter(Adapter):
    """Tent (Wang et al., ICLR 2021): minimise the mean prediction entropy of each batch by one
    optimiser step (``steps``) on the normalisation layers' affine parameters; BatchNorm uses
    batch statistics. Returns the logits of the forward that computed the loss (as the anchor).
    LayerNorm affine parameters are the ones adapted in a ViT. Defaults: Adam, lr 1e-3, betas
    (0.9, 0.999), no weight decay (the anchor's CIFAR-10-C setting; ImageNet-C uses SGD lr
    2.5e-4, momentum 0.9, for batch 64).
    """

    def __init__(self, model: nn.Module, args: TentArgs) -> None:
        super().__init__(model, args)
        self.net = copy.deepcopy(model)
        self.params = configure_norms(self.net, trainable="norm")
        self.opt = optimizer_for(self.params, args)
        self._start = clone_state(self.net)
        self._opt_start = copy.deepcopy(self.opt.state_dict())

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(self.args.steps):
            logits = self.forward(self.net, images)
            loss = entropy(logits).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.counts["backward"] += images.shape[0]
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(self.net, images)

    def reset(self) -> None:
        self.net.load_state_dict(self._start)
        self.opt.load_state_dict(copy.deepcopy(self._opt_start))

    def _state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


@register_adapter("tent", TentArgs)
def _tent(model: nn.Module, args: TentArgs) -> Adapter:
    return TentAdapter(model, args)


class CoTTAArgs(OptimArgs):
    ema: float = Field(0.999, ge=0, lt=1)
    restore_p: float = Field(0.01, ge=0, le=1)
    confidence: float = Field(0.92, ge=0, le=1)
    n_augmentations: int = Field(32, ge=1)
    soft_augment: bool = False
    params: Literal["all", "norm"] = "all"
    seed: int = 0


class CoTTAAdapter(Adapter):
    """CoTTA (Wang et al., CVPR 2022), per batch:

    1. the student's logits on the batch; the anchor (the frozen source copy, batch-statistics
       BatchNorm) gives its mean top-class probability;
    2. the teacher's prediction: on the batch, or, when the anchor's mean confidence is below
       ``confidence`` (0.92, the anchor's CIFAR-10-C value), the mean of the teacher's logits
       over ``n_augmentations`` (32) augmented views (CoTTA's colour jitter, affine, blur, flip,
       noise; batched, seeded here, per-sample parameters);
    3. one optimiser step of the student on the cross-entropy to the teacher's soft labels;
    4. teacher <- ema * teacher + (1 - ema) * student (ema 0.999);
    5. stochastic restore: each adapted parameter element goes back to its source value with
       probability ``restore_p`` (0.01), masks from the adapter's seeded generator.
    Returns the teacher's prediction (step 2). ``params="all"`` adapts every parameter the
    prediction depends on (as CoTTA); ``"norm"`` only the normalisation affine parameters. The
    adapted set is fixed at the first batch: the candidates that receive a gradient (a CLIP
    text tower behind fixed class features, e.g. its 49408-row token table, is left out rather
    than restored and averaged for nothing).
    """

    def __init__(self, model: nn.Module, args: CoTTAArgs) -> None:
        super().__init__(model, args)
        self.student = copy.deepcopy(model)
        configure_norms(self.student, trainable=args.params)
        self.anchor = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.names: list[str] | None = None
        self.params: list[nn.Parameter] = []
        self.opt: torch.optim.Optimizer | None = None
        self.gen = generator_for(self.device, args.seed)

    def _select(self, names: list[str]) -> None:
        """Adapt exactly ``names``: the others stop requiring grad; a fresh optimiser."""
        params = dict(self.student.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in names)
        self.names = list(names)
        self.params = [params[n] for n in self.names]
        self.opt = optimizer_for(self.params, self.args)

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            confident = mean_confidence(self.forward(self.anchor, images)) >= self.args.confidence
            if bool(confident):
                return self.forward(self.teacher, images)
            views = [
                self.forward(
                    self.teacher, cotta_augment(images, self.gen, soft=self.args.soft_augment)
                ).float()
                for _ in range(self.args.n_augmentations)
            ]
            return torch.stack(views).mean(0)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        a = self.args
        student = self.forward(self.student, images)
        teacher = self._teacher_logits(images)
        loss = soft_cross_entropy(student, teacher).mean()
        loss.backward()
        self.counts["backward"] += images.shape[0]
        if self.opt is None:
            named = self.student.named_parameters()
            self._select([n for n, p in named if p.requires_grad and p.grad is not None])
        assert self.opt is not None and self.names is not None
        self.opt.step()
        self.student.zero_grad(set_to_none=True)
        src = dict(self.anchor.named_parameters())
        tea = dict(self.teacher.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                tea[name].lerp_(p, 1.0 - a.ema)
                if a.restore_p > 0:
                    keep = torch.rand(p.shape, generator=self.gen, device=p.device) >= a.restore_p
                    p.copy_(torch.where(keep, p, src[name]))
        return teacher

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher on the batch (without the augmentation average)."""
        return self.forward(self.teacher, images)

    def reset(self) -> None:
        start = self.anchor.state_dict()
        self.student.load_state_dict(start)
        self.teacher.load_state_dict(start)
        if self.names is not None:
            self._select(self.names)
        self.gen.manual_seed(self.args.seed)

    def _state(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "names": self.names,
            "opt": None if self.opt is None else self.opt.state_dict(),
            "gen": self.gen.get_state(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        if state["names"] is not None:
            self._select(state["names"])
            assert self.opt is not None
            self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])


@register_adapter("cotta", CoTTAArgs)
def _cotta(model: nn.Module, args: CoTTAArgs) -> Adapter:
    return CoTTAAdapter(model, args)
