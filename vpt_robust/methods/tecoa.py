"""TeCoA: text-guided contrastive adversarial training (Mao et al., ICLR 2023), and its baselines.

TeCoA minimises the cross-entropy over ``logit_scale * cos(f(x_adv), t_c)``: the image feature of
the ADVERSARIAL image against the frozen text feature of every training class prompt, i.e. the
CLIP zero-shot head evaluated on PGD examples. The adversarial image is found by L-inf PGD that
maximises that same loss through the prompted model, in [0,1] pixel space before the
normalisation (cvlab-columbia/ZSRobust4FoundationModel ``attacks.py`` ``attack_pgd``: uniform
random start, sign steps, projection, clamp to the image box; training uses eps 1/255, 2 steps
of 1/255). Here the attack is ``vpt_robust.attacks.pgd``, the same PGD the evaluation uses, run
with the model in eval mode (``objectives.eval_mode``: no prompt dropout while attacking).

What learns is a visual prompt (token prompt, padding prompt or both; the official
``visual_prompt.py`` trains a padding prompter and an appended-token prompter together), or the
whole image tower (``finetuning.py``: the image module's parameters only, text frozen): the one
place in this project where backbone weights train, through :func:`finetune_classifier`, which
the trainer accepts only with ``train_prompt(..., finetune=True)`` and the saved file records
(``save_prompted_model(..., finetune=True)``).

Adversarial tuning WITHOUT text guidance: the paper's "standard adversarial training" baseline
trains with one-hot cross-entropy through a classification layer instead of the text features;
the official repository holds no code for it, so we follow the paper's description: the same
prompt with a learned linear head, trained on the same PGD examples (:class:`NoTextATObjective`);
for the zero-shot evaluation the linear head (bound to the training classes) is dropped and the
learned prompt is used with the zero-shot text head of the evaluated classes
(:func:`zero_shot_transfer`), the only way such a model can classify classes it never saw.

Usable in a user's own loop: ``loss = tecoa_loss(model, images, labels, attack=PGDAttack(...))``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.attacks.pgd import NORMS, pgd
from vpt_robust.config import HeadConfig, PromptConfig
from vpt_robust.methods.objectives import ObjectiveOutput, eval_mode
from vpt_robust.models.backbone import Backbone
from vpt_robust.models.classifier import PromptedClassifier, build_classifier
from vpt_robust.models.heads import ContextTextHead, LinearHead, ZeroShotHead

__all__ = [
    "NoTextATObjective",
    "PGDAttack",
    "TeCoAObjective",
    "TeCoAHeadError",
    "finetune_classifier",
    "tecoa_loss",
    "zero_shot_transfer",
]

IDENTITY_VERSION = 1


class TeCoAHeadError(TypeError):
    """The model's head does not fit the objective (TeCoA needs the text head, the no-text
    baseline a linear head)."""


@dataclass(frozen=True)
class PGDAttack:
    """The inner attack: ``norm`` PGD of ``steps`` steps of size ``alpha`` within ``eps``,
    from a uniform random start if ``random_start`` (TeCoA's training attack: 1/255, 2, 1/255).

    Called as ``attack(model, images, labels) -> adversarial images`` with the model in eval
    mode (each submodule's mode restored afterwards). Random starts come from torch's global RNG,
    which the trainer's checkpoints restore, so an adversarial run resumes bit-identically.
    """

    eps: float = 1 / 255
    steps: int = 2
    alpha: float = 1 / 255
    random_start: bool = True
    norm: str = "Linf"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"attack.norm: {self.norm!r} is not one of {NORMS}")
        for name in ("eps", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"attack.{name}: {value!r} must be a finite number >= 0")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"attack.steps: {self.steps!r} must be an int >= 0")

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "eps": float(self.eps),
            "steps": int(self.steps),
            "alpha": float(self.alpha),
            "random_start": bool(self.random_start),
            "norm": self.norm,
        }

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with eval_mode(model):
            return pgd(
                model,
                images,
                labels,
                eps=float(self.eps),
                alpha=float(self.alpha),
                steps=self.steps,
                norm=self.norm,
                random_start=self.random_start,
            )


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    if head is None:
        raise TeCoAHeadError(
            f"{type(model).__name__} has no `head`: TeCoA needs a PromptedClassifier"
        )
    return head


def require_text_head(model: nn.Module) -> None:
    """TeCoA's logits are CLIP's zero-shot head: cosine to class text features x logit scale."""
    head = _head(model)
    if not isinstance(head, ZeroShotHead | ContextTextHead):
        raise TeCoAHeadError(
            f"TeCoA needs the zero-shot text head (logit_scale * cos to class text features); "
            f"this model has a {type(head).__name__}. Build it with head kind 'zero_shot', or "
            "use NoTextATObjective for adversarial training with a linear head"
        )


def tecoa_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack: PGDAttack | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TeCoA's loss on one batch of [0,1] ``images``: CE over the text head's logits of the
    adversarial images that ``attack`` (default ``PGDAttack()``: 1/255, 2 steps of 1/255) finds
    through ``model``. The model's mode is left as given for the loss forward (train mode while
    training: prompt dropout applies to the loss, not to the attack). With ``return_logits`` also
    returns the logits on the adversarial images."""
    require_text_head(model)
    attack = PGDAttack() if attack is None else attack
    adv = attack(model, images, labels)
    logits = model(adv)
    loss = F.cross_entropy(logits.float(), labels)
    return (loss, logits) if return_logits else loss


def _perturbation(adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return (adv - images).detach().abs().flatten(1).amax(1).mean()


@dataclass(frozen=True)
class TeCoAObjective:
    """The trainer objective of TeCoA (``train_prompt(..., objective=TeCoAObjective(attack))``):
    loss as :func:`tecoa_loss`, logits on the adversarial images (the training accuracy is the
    robust one), aux ``linf``: the mean L-inf size of the perturbation actually used."""

    attack: PGDAttack = field(default_factory=PGDAttack)

    @property
    def identity(self) -> dict[str, Any]:
        return {"version": IDENTITY_VERSION, "loss": "tecoa", "attack": self.attack.identity}

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> ObjectiveOutput:
        require_text_head(model)
        adv = self.attack(model, images, labels)
        logits = model(adv)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, logits, {"linf": _perturbation(adv, images)}


@dataclass(frozen=True)
class NoTextATObjective:
    """Adversarial training without text guidance (the paper's standard-AT baseline): one-hot
    cross-entropy through a learned LINEAR head on the same PGD examples. Evaluate it zero-shot
    with :func:`zero_shot_transfer` (the linear head dropped, the text head of the new classes)."""

    attack: PGDAttack = field(default_factory=PGDAttack)

    @property
    def identity(self) -> dict[str, Any]:
        return {"version": IDENTITY_VERSION, "loss": "onehot_ce", "attack": self.attack.identity}

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> ObjectiveOutput:
        head = _head(model)
        if not isinstance(head, LinearHead):
            raise TeCoAHeadError(
                "NoTextATObjective trains without text guidance: it needs a linear head, this "
                f"model has a {type(head).__name__} (use TeCoAObjective for the text head)"
            )
        adv = self.attack(model, images, labels)
        logits = model(adv)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, logits, {"linf": _perturbation(adv, images)}


def finetune_classifier(
    backbone: Backbone, class_names: Sequence[str], head: HeadConfig
) -> PromptedClassifier:
    """The TeCoA fine-tune model: a PRIVATE copy of ``backbone`` whose image tower trains (text
    tower, logit scale and the given backbone untouched), no prompt, the zero-shot text head over
    ``class_names``. Train it with ``train_prompt(..., finetune=True)`` and save it with
    ``save_prompted_model(..., finetune=True)``; nothing else accepts trained backbone weights."""
    if not backbone.has_text:
        raise TeCoAHeadError("TeCoA fine-tuning needs a CLIP backbone (a text tower)")
    private = copy.deepcopy(backbone)
    private.image_model.requires_grad_(True)
    model = build_classifier(
        private,
        class_names,
        PromptConfig(kind="none"),
        head.model_copy(update={"kind": "zero_shot"}),
    )
    return model


def zero_shot_transfer(
    model: PromptedClassifier, class_names: Sequence[str], head: HeadConfig
) -> PromptedClassifier:
    """``model``'s learned prompt (and fine-tuned image tower, if any) with the zero-shot text
    head over ``class_names``; a linear head is dropped. How a model trained on some classes
    (with or without text) classifies classes it never saw."""
    spec = model.spec.get("prompt")
    if spec is None:
        raise ValueError("model has no spec: build it with build_classifier")
    prompt = PromptConfig.model_validate({**spec, "head": None})  # the text head, always
    out = build_classifier(
        model.backbone, class_names, prompt, head.model_copy(update={"kind": "zero_shot"})
    )
    learned = {k: v for k, v in model.learned_state().items() if not k.startswith("head.")}
    out.load_learned_state(learned)
    return out.eval()
