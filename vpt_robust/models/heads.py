"""Classification heads on image features: CLIP's zero-shot head (fixed class text features, or
text features from a learned CoOp context) and a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class ContextTextHead(nn.Module):
    """CLIP's zero-shot head whose class text features come from a learned context (CoOp).

    In training mode the text features are recomputed at every forward (gradients reach the
    context). In eval mode they are computed once without gradients and cached until the context
    changes: the cache is keyed on the context tensor's version counter, which every in-place
    update (an optimiser step, loading a saved context) bumps, and on its device and dtype.
    """

    def __init__(self, backbone: Backbone, context: nn.Module) -> None:
        super().__init__()
        self.context = context
        # Not a submodule: the classifier owns the backbone; the head only calls its text tower.
        self.__dict__["_backbone"] = backbone
        self.register_buffer("logit_scale", backbone.logit_scale.detach().float().clone())
        self._cache: tuple[Any, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.context.num_classes)

    def _key(self) -> tuple[Any, ...]:
        ctx = self.context.ctx
        return (ctx._version, ctx.data_ptr(), ctx.device, ctx.dtype)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features ``(C, D)`` for the current context."""
        backbone = self.__dict__["_backbone"]
        if self.training:
            self._cache = None
            return F.normalize(self.context(backbone).float(), dim=-1)
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                feats = F.normalize(self.context(backbone).float(), dim=-1)
            self._cache = (key, feats)
        return self._cache[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features.float(), dim=-1)
        return self.logit_scale * feats @ self.text_features().t()


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
