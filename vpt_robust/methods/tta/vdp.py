"""VDP: visual domain prompts for continual test-time adaptation (Gan et al., AAAI 2023).

No official code exists; every choice the paper leaves open is written here and is an argument.

- Frozen source. No weight is ever written: every forward runs under ``frozen(model)`` (eval
  mode, no parameter requiring grad; flags restored), gradients are taken with
  ``torch.autograd.grad`` w.r.t. the prompts only, so no ``.grad`` lands on the model. The
  paper's backbones are ViTs (LayerNorm only); on a BatchNorm model ``batch_stats`` (default)
  runs a copy whose BatchNorm layers normalise with the test batch's statistics, as every CTTA
  baseline does (the ``norm`` adapter is that copy alone, the reference for what the prompts
  add); ``batch_stats=False`` keeps the source's running statistics.
- Prompts (``vpt_robust.prompts.domain.DomainPrompt``): additive rings on the [0,1] input at
  the resolution of the incoming images (sized from the first batch): the domain-agnostic
  prompt (DAP) on the outer ``dap_width`` px, the domain-specific prompt (DSP) on the
  ``dsp_width`` px ring just inside it (1 px each by default: 12% and 11% of a 32 px image).
  Zero init, so before adapting VDP predicts exactly as its frozen source (tested).
- Teacher-student as in CoTTA: the teacher holds an EMA (``ema``, 0.999) of the student's
  prompts; its prediction on the batch is VDP's output (``output="teacher"``; ``"ensemble"``
  returns the augmentation average instead, as CoTTA does: measured worse on the 32 px model).
  The student's target is the teacher's prediction averaged over ``n_augmentations`` CoTTA
  augmentations when the source model's mean confidence is below ``confidence``, else the
  teacher's plain prediction; ``steps`` Adam steps (``lr``) per batch on the student prompts'
  cross-entropy to it: soft (``target="soft"``, the paper's) or to its argmax (``"hard"``,
  optionally only where the target's top probability reaches ``pseudo_threshold``). Without
  augmented views the soft target is the student's own prediction: its gradient is zero up to
  rounding (which Adam still turns into steps of size ~lr); the hard target still has a
  gradient. No stochastic restore (the source weights never move).
- Homeostasis (synaptic-intelligence-like importance, on the DAP only): per DAP value, omega
  accumulates ``relu(-g * delta)``, the first-order loss decrease the value's applied change
  ``delta`` earned with this step's gradient ``g``. With T steps so far, the relative importance
  is ``Omega = omega / (mean(omega) / T)`` (mean T; unit-free, grows as knowledge accumulates),
  and each Adam update of the DAP is scaled by ``1 / (1 + importance * Omega)`` (scaling the
  update, not the gradient: Adam would undo a gradient scale). The DSP moves freely.
- Domain-change detection: an EMA (``shift_momentum``) of the source model's mean batch
  confidence on the raw images (a signal of the data alone, not of the adapted state); a batch
  whose confidence differs from it by more than ``shift_threshold`` is a new domain: the DSP
  (student and teacher) goes back to zero, its Adam moments are dropped, and the EMA restarts
  at the batch's confidence. The DAP and its importance persist.
- Ablations (registered names): ``vdp_dap_only``, ``vdp_dsp_only`` (one prompt),
  ``vdp_no_homeostasis`` (the DAP moves as freely as the DSP).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vpt_robust.methods.tta.augment import cotta_augment
from vpt_robust.methods.tta.base import (
    Adapter,
    AdapterArgs,
    frozen,
    generator_for,
    mean_confidence,
    register_adapter,
    soft_cross_entropy,
    use_batch_statistics,
)
from vpt_robust.prompts.domain import DomainPrompt


class VDPArgs(AdapterArgs):
    prompts: Literal["both", "dap", "dsp"] = "both"
    homeostasis: bool = True
    batch_stats: bool = True
    dap_width: int = Field(1, ge=1)
    dsp_width: int = Field(1, ge=1)
    lr: float = Field(5e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    ema: float = Field(0.999, ge=0, lt=1)
    confidence: float = Field(0.92, ge=0, le=1)
    n_augmentations: int = Field(32, ge=1)
    soft_augment: bool = False
    output: Literal["teacher", "ensemble"] = "teacher"
    target: Literal["soft", "hard"] = "soft"
    pseudo_threshold: float = Field(0.0, ge=0, lt=1)
    steps: int = Field(1, ge=1)
    importance: float = Field(0.1, ge=0)
    shift_momentum: float = Field(0.8, ge=0, lt=1)
    shift_threshold: float = Field(0.1, gt=0)
    seed: int = 0


class VDPDapOnlyArgs(VDPArgs):
    prompts: Literal["dap"] = "dap"


class VDPDspOnlyArgs(VDPArgs):
    prompts: Literal["dsp"] = "dsp"


class VDPNoHomeostasisArgs(VDPArgs):
    homeostasis: Literal[False] = False


class VDPAdapter(Adapter):
    """Domain-agnostic + domain-specific input prompts on a frozen model (see module doc)."""

    def __init__(self, model: nn.Module, args: VDPArgs) -> None:
        if args.batch_stats:
            model = copy.deepcopy(model)
            use_batch_statistics(model)
        super().__init__(model, args)
        self.kinds = {"both": ("dap", "dsp"), "dap": ("dap",), "dsp": ("dsp",)}[args.prompts]
        self.size: int | None = None
        self.gen = generator_for(self.device, args.seed)
        self._clear()

    # ------------------------------------------------------------ state
    def _clear(self) -> None:
        self.student: dict[str, DomainPrompt] = {}
        self.teacher: dict[str, DomainPrompt] = {}
        self.opt: torch.optim.Optimizer | None = None
        self.omega: torch.Tensor | None = None
        self.steps = 0
        self.conf_ema: float | None = None
        self.shifts = 0

    def _build(self, size: int) -> None:
        a = self.args
        ring = {"dap": (a.dap_width, 0), "dsp": (a.dsp_width, a.dap_width)}
        self.size = size
        for k in self.kinds:
            width, inset = ring[k] if self.args.prompts == "both" else (ring[k][0], 0)
            self.student[k] = DomainPrompt(size, width, inset).to(self.device)
            self.teacher[k] = copy.deepcopy(self.student[k]).requires_grad_(False)
        groups = [{"params": [self.student[k].delta], "name": k} for k in self.kinds]
        self.opt = torch.optim.Adam(groups, lr=a.lr, betas=a.betas)
        if "dap" in self.student:
            self.omega = torch.zeros_like(self.student["dap"].delta)

    def _ensure(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"vdp: expected square images, got {h}x{w}")
        if self.size is None:
            self._build(int(h))
        elif self.size != h:
            raise ValueError(f"vdp: prompts were sized for {self.size} px images, got {h} px")

    def reset(self) -> None:
        self.size = None
        self._clear()
        self.gen.manual_seed(self.args.seed)

    def _state(self) -> dict[str, Any]:
        if self.size is None:
            return {"size": None, "gen": self.gen.get_state()}
        assert self.opt is not None
        return {
            "size": self.size,
            "student": {k: p.delta.detach() for k, p in self.student.items()},
            "teacher": {k: p.delta.detach() for k, p in self.teacher.items()},
            "opt": self.opt.state_dict(),
            "omega": self.omega,
            "steps": self.steps,
            "conf_ema": self.conf_ema,
            "shifts": self.shifts,
            "gen": self.gen.get_state(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.reset()
        self.gen.set_state(state["gen"])
        if state["size"] is None:
            return
        self._build(int(state["size"]))
        assert self.opt is not None
        with torch.no_grad():
            for k in self.kinds:
                self.student[k].delta.copy_(state["student"][k])
                self.teacher[k].delta.copy_(state["teacher"][k])
        self.opt.load_state_dict(state["opt"])
        self.omega = state["omega"]
        self.steps, self.conf_ema, self.shifts = state["steps"], state["conf_ema"], state["shifts"]

    # ------------------------------------------------------------ forward
    @staticmethod
    def _prompted(images: torch.Tensor, prompts: dict[str, DomainPrompt]) -> torch.Tensor:
        for p in prompts.values():  # disjoint rings: one after the other == summed, clamped once
            images = p(images)
        return images

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher prompts on the frozen model (no augmentation average)."""
        self._ensure(images)
        with frozen(self.model):
            return self.forward(self.model, self._prompted(images, self.teacher))

    def _detect_shift(self, conf: float) -> None:
        a = self.args
        if self.conf_ema is None:
            self.conf_ema = conf
            return
        if abs(conf - self.conf_ema) > a.shift_threshold:
            self.shifts += 1
            self.conf_ema = conf
            if "dsp" in self.student:
                assert self.opt is not None
                with torch.no_grad():
                    self.student["dsp"].delta.zero_()
                    self.teacher["dsp"].delta.zero_()
                self.opt.state.pop(self.student["dsp"].delta, None)
            return
        self.conf_ema = a.shift_momentum * self.conf_ema + (1 - a.shift_momentum) * conf

    def _teacher_logits(
        self, images: torch.Tensor, conf: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher on the batch, and its target (the augmentation average when unsure)."""
        a = self.args
        plain = self.forward(self.model, self._prompted(images, self.teacher))
        if conf >= a.confidence:
            return plain, plain
        views = [
            self.forward(
                self.model,
                self._prompted(cotta_augment(images, self.gen, soft=a.soft_augment), self.teacher),
            ).float()
            for _ in range(a.n_augmentations)
        ]
        return plain, torch.stack(views).mean(0)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        self._ensure(images)
        assert self.opt is not None
        with frozen(self.model):
            with torch.no_grad():
                conf = float(mean_confidence(self.forward(self.model, images)))
                self._detect_shift(conf)
                plain, teacher = self._teacher_logits(images, conf)
            for _ in range(self.args.steps):
                grads = self._grads(images, teacher)
                self.counts["backward"] += images.shape[0]
                self._step(dict(zip(self.kinds, grads, strict=True)))
        return teacher if self.args.output == "ensemble" else plain

    def _grads(self, images: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients of the student's loss against the teacher's target, w.r.t. the prompts."""
        a = self.args
        student = self.forward(self.model, self._prompted(images, self.student)).float()
        if a.target == "hard":
            probs = teacher.float().softmax(-1)
            keep = (probs.amax(-1) >= a.pseudo_threshold).float()
            ce = F.cross_entropy(student, probs.argmax(-1), reduction="none")
            loss = (ce * keep).sum() / keep.sum().clamp_min(1.0)
        else:
            loss = soft_cross_entropy(student, teacher).mean()
        params = [self.student[k].delta for k in self.kinds]
        return torch.autograd.grad(loss, params)

    def _step(self, grads: dict[str, torch.Tensor]) -> None:
        assert self.opt is not None
        a = self.args
        dap = self.student.get("dap")
        old = dap.delta.detach().clone() if dap is not None else None
        for k, g in grads.items():
            self.student[k].delta.grad = g
        self.opt.step()
        with torch.no_grad():
            if dap is not None and old is not None and self.omega is not None:
                g = grads["dap"]
                if a.homeostasis:
                    mean = float(self.omega.mean())
                    rel = self.omega * (self.steps / mean) if mean > 0 else torch.zeros_like(old)
                    dap.delta.copy_(old + (dap.delta - old) / (1.0 + a.importance * rel))
                self.omega += torch.relu(-g * (dap.delta - old))
            for k in self.kinds:
                self.student[k].delta.grad = None
                self.teacher[k].delta.lerp_(self.student[k].delta, 1.0 - a.ema)
        self.steps += 1


@register_adapter("vdp", VDPArgs)
def _vdp(model: nn.Module, args: VDPArgs) -> Adapter:
    return VDPAdapter(model, args)


@register_adapter("vdp_dap_only", VDPDapOnlyArgs)
def _vdp_dap_only(model: nn.Module, args: VDPArgs) -> Adapter:
    return VDPAdapter(model, args)


@register_adapter("vdp_dsp_only", VDPDspOnlyArgs)
def _vdp_dsp_only(model: nn.Module, args: VDPArgs) -> Adapter:
    return VDPAdapter(model, args)


@register_adapter("vdp_no_homeostasis", VDPNoHomeostasisArgs)
def _vdp_no_homeostasis(model: nn.Module, args: VDPArgs) -> Adapter:
    return VDPAdapter(model, args)
