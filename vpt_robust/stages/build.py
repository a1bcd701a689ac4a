"""Building the classifiers the stages train and evaluate, from params and saved files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vpt_robust.config import HeadConfig, Params, PromptConfig
from vpt_robust.models import Backbone, PromptedClassifier, load_backbone
from vpt_robust.models.classifier import build_classifier
from vpt_robust.prompts.io import load_prompted_model
from vpt_robust.stages.common import Layout


def backbone_for(params: Params, device: torch.device) -> Backbone:
    return load_backbone(params.backbone, device, checkpoint=Layout.of(params).checkpoint)


def families(params: Params) -> list[PromptConfig]:
    """The prompt families the pipeline learns, in report order: the ``prompts`` list."""
    return list(params.prompts)


def family_name(params: Params, family: PromptConfig) -> str:
    return family.family_name(params.head.kind)


def transfers_to_new_classes(params: Params, family: PromptConfig) -> bool:
    """Whether ``family``'s learned tensors can classify classes it was not trained on: not
    with a linear head or a class-specific CoOp context (those are bound to their classes)."""
    if family.head_kind(params.head.kind) == "linear":
        return False
    return not any(kind == "coop" and args.get("class_specific") for kind, args in family.parts())


def prompt_path(layout: Layout, family: str, seed: int) -> Path:
    """``outputs/prompts/<family>/seed_<seed>`` (+ ``.safetensors`` / ``.json``)."""
    return layout.prompts_dir / family / f"seed_{seed}"


def checkpoint_path(layout: Layout, family: str, seed: int) -> Path:
    """The resumable training checkpoint of one run; outside the stage's DVC outputs, so that
    DVC does not delete it before a re-run that should resume from it."""
    return layout.outputs / "checkpoints" / "train_prompt" / family / f"seed_{seed}.pt"


def classifier(
    backbone: Backbone,
    class_names: Sequence[str],
    params: Params,
    *,
    prompted: bool,
    family: PromptConfig | None = None,
) -> PromptedClassifier:
    """A fresh classifier over ``class_names``: the zero-shot model (``prompted=False``), or
    with a new prompt of ``family`` (default: the first configured family)."""
    if not prompted:
        return build_classifier(
            backbone,
            class_names,
            None,
            HeadConfig(kind="zero_shot", templates=params.head.templates),
        )
    return build_classifier(backbone, class_names, family or families(params)[0], params.head)


def load_family(
    backbone: Backbone, class_names: Sequence[str], params: Params, family: str, seed: int
) -> PromptedClassifier:
    """The classifier learned by ``train_prompt`` for ``family`` and ``seed``, over
    ``class_names`` (refused with ClassMismatchError if its learned tensors are bound to the
    training classes and ``class_names`` are others; PromptMismatchError for another backbone)."""
    path = prompt_path(Layout.of(params), family, seed)
    return load_prompted_model(
        path, backbone.mean.device, backbone=backbone, class_names=class_names
    )
