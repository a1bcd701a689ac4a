"""Building the classifiers the stages evaluate, from params and saved files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vpt_robust.config import Params
from vpt_robust.models import Backbone, PromptedClassifier, load_backbone, zero_shot_head
from vpt_robust.prompts import build_prompt
from vpt_robust.prompts.io import load_prompt_state
from vpt_robust.stages.common import Layout


def backbone_for(params: Params, device: torch.device) -> Backbone:
    return load_backbone(params.backbone, device, checkpoint=Layout.of(params).checkpoint)


def classifier(
    backbone: Backbone, class_names: Sequence[str], params: Params, *, prompted: bool
) -> PromptedClassifier:
    """Zero-shot classifier over ``class_names``, with a fresh prompt of the configured family."""
    head = zero_shot_head(backbone, class_names, params.head.templates)
    prompt = None
    if prompted:
        args: dict[str, Any] = params.prompt.model_dump(exclude={"kind"})
        prompt = build_prompt(params.prompt.kind, args, backbone.image_size)
    return PromptedClassifier(backbone, head, pixel_prompt=prompt).to(backbone.mean.device)


def load_prompted(
    backbone: Backbone, class_names: Sequence[str], params: Params, path: Path
) -> PromptedClassifier:
    """A classifier with a saved prompt; refuses prompts learned on another backbone."""
    tensors, _ = load_prompt_state(path, expected_identity=backbone.identity)
    model = classifier(backbone, class_names, params, prompted=True)
    model.load_learned_state({k: v.to(backbone.mean.device) for k, v in tensors.items()})
    return model.eval()
