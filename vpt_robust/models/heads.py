"""Classification heads on image features: CLIP's zero-shot head and a linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpt_robust.models.backbone import Backbone

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ZeroShotHead(nn.Module):
    """Cosine similarity to fixed class text features, times CLIP's logit scale."""

    def __init__(self, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> None:
        super().__init__()
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale).detach().float())

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features.float(), dim=-1)
        return self.logit_scale * feats @ self.text_features.t()


class LinearHead(nn.Module):
    """A learned linear classifier on image features (the linear-probe head)."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.float())


@torch.no_grad()
def class_text_features(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """One normalised text feature per class: the mean over templates (CLIP's prompt ensemble)."""
    if not class_names:
        raise ValueError("class_names is empty")
    device = backbone.mean.device
    feats = []
    for name in class_names:
        texts = [t.format(name) for t in templates]
        emb = F.normalize(backbone.encode_text(backbone.tokenize(texts).to(device)).float(), dim=-1)
        feats.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(feats)


def zero_shot_head(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> ZeroShotHead:
    """Build the zero-shot head once: class text features are computed here and cached."""
    return ZeroShotHead(class_text_features(backbone, class_names, templates), backbone.logit_scale)
