"""Classification heads on image features: CLIP's zero-shot head (fixed class text features, or
text features from a learned CoOp context) and a linear head."""

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


class ContextTextHead(nn.Module):
    """CLIP's zero-shot head whose class text features come from a learned context (CoOp).

    Whether the text features carry a gradient follows torch's grad mode, not ``training``:
    when grad is enabled and the context requires grad they are recomputed at every forward with
    the graph (prompt tuning, and test-time tuning of the context with the model in eval mode,
    TPT). Otherwise (``torch.no_grad()``, or a frozen context) they are computed once without a
    graph and cached until the context changes. The cache is keyed on the context's content (a
    private copy compared with ``torch.equal``; the context is small), its device and dtype, so
    every way of changing it invalidates the cache: an optimiser step, ``load_state_dict``,
    ``copy_``, and writes through ``.data``, which do not bump the version counter.
    """

    def __init__(self, backbone: Backbone, context: nn.Module) -> None:
        super().__init__()
        self.context = context
        # Not a submodule: the classifier owns the backbone; the head only calls its text tower.
        self.__dict__["_backbone"] = backbone
        self.register_buffer("logit_scale", backbone.logit_scale.detach().float().clone())
        # (copy of the context the features were computed from, features); not in state_dict.
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.context.num_classes)

    def _cache_hit(self, ctx: torch.Tensor) -> bool:
        if self._cache is None:
            return False
        seen = self._cache[0]
        return (
            seen.device == ctx.device
            and seen.dtype == ctx.dtype
            and seen.shape == ctx.shape
            and torch.equal(seen, ctx.detach())
        )

    def text_features(self) -> torch.Tensor:
        """Normalised class text features ``(C, D)`` for the current context."""
        backbone = self.__dict__["_backbone"]
        ctx = self.context.ctx
        if torch.is_grad_enabled() and ctx.requires_grad:
            return F.normalize(self.context(backbone).float(), dim=-1)
        if not self._cache_hit(ctx):
            # Outside inference mode, so that the cached features may later meet tensors that
            # require grad (an attack on the image under a frozen context).
            with torch.inference_mode(False), torch.no_grad():
                feats = F.normalize(self.context(backbone).float(), dim=-1)
                self._cache = (ctx.detach().clone(), feats)
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
