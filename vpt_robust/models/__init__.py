"""Backbones (open_clip, timm, embedded tiny CLIP), heads and the prompted classifier."""

from vpt_robust.models.backbone import Backbone, BackboneError, load_backbone
from vpt_robust.models.classifier import PromptedClassifier
from vpt_robust.models.heads import LinearHead, ZeroShotHead, class_text_features, zero_shot_head

__all__ = [
    "Backbone",
    "BackboneError",
    "LinearHead",
    "PromptedClassifier",
    "ZeroShotHead",
    "class_text_features",
    "load_backbone",
    "zero_shot_head",
]
