"""The classifier every stage sees: frozen backbone + prompts + head, taking [0,1] images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vpt_robust.config import HeadConfig, PromptConfig
from vpt_robust.models.backbone import Backbone, BackboneError
from vpt_robust.models.heads import ContextTextHead, LinearHead, zero_shot_head


class PromptedClassifier(nn.Module):
    """``logits = head(encode_image(pixel_prompt(images), token_prompt))``.

    A pixel prompt acts on the [0,1] image at the model's size (``space="raw"``, e.g. EVP) or on
    the normalised image (``space="normalized"``, e.g. the padding prompt); a token prompt adds
    tokens to the ViT's sequence; a text prompt lives in the head (``ContextTextHead``). Any of
    them may be absent, and a pixel and a token prompt can be stacked.

    Training, attacks and evaluation only call ``forward``; they never need to know which prompts
    are plugged in. Only the prompts and (for a linear head) the head hold trainable parameters.

    Input-dependent token prompts (L2P's pool) set ``needs_query = True``: before encoding,
    ``forward`` computes the query, the frozen model's feature of the image without any
    prompt (``query``; once per forward, no gradient), and calls the prompt's
    ``prepare(query)``. Auxiliary losses (L2P's key pull) reach a training objective through
    ``auxiliary_losses()``: after a forward it returns every prompt's losses of that forward
    (an objective adds them; the trainer never sees prompts).
    ``spec`` records the prompt and head configs the classifier was built from (what a saved
    prompt needs to rebuild it), ``class_names`` the classes of its logits.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        pixel_prompt: nn.Module | None = None,
        token_prompt: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pixel_prompt = pixel_prompt
        self.token_prompt = token_prompt
        self.spec: dict[str, Any] = {}
        self.class_names: tuple[str, ...] = ()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.backbone.resize(images)
        if getattr(self.token_prompt, "needs_query", False):
            self.token_prompt.prepare(self._query_resized(x))
        space = getattr(self.pixel_prompt, "space", "normalized")
        if self.pixel_prompt is not None and space == "raw":
            x = self.pixel_prompt(x)
        x = self.backbone.standardize(x)
        if self.pixel_prompt is not None and space != "raw":
            x = self.pixel_prompt(x)
        return self.head(self.backbone.encode_image(x, token_prompt=self.token_prompt))

    def _query_resized(self, resized: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_image(self.backbone.standardize(resized)).detach()

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen model's features of [0,1] ``images`` without any prompt (pixel or token):
        the query an input-dependent prompt selects by; no gradient."""
        return self._query_resized(self.backbone.resize(images))

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The prompts' auxiliary losses of the last forward (``{}`` for plain prompts), e.g.
        ``{"key_pull": ...}`` for an L2P pool; names are unique across prompts."""
        out: dict[str, torch.Tensor] = {}
        for module in (self.pixel_prompt, self.token_prompt):
            losses = getattr(module, "auxiliary_losses", None)
            if callable(losses):
                for name, value in losses().items():
                    if name in out:
                        raise ValueError(f"auxiliary loss {name!r} reported by two prompts")
                    out[name] = value
        return out

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors that training changed (prompts, linear head): what gets saved."""
        return {k: p.detach() for k, p in self.named_parameters() if p.requires_grad}

    def load_learned_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load saved prompt tensors; every saved tensor must find its slot, and vice versa."""
        expected = {k for k, p in self.named_parameters() if p.requires_grad}
        if set(tensors) != expected:
            raise ValueError(
                f"saved tensors {sorted(tensors)} do not match this model's prompts {sorted(expected)}"
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                if params[k].shape != v.shape:
                    raise ValueError(
                        f"{k}: saved shape {tuple(v.shape)} != {tuple(params[k].shape)}"
                    )
                params[k].copy_(v)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    @property
    def class_bound(self) -> bool:
        """True when the learned tensors belong to this exact class list (a linear head or a
        class-specific CoOp context) and so cannot be reused for other classes."""
        if isinstance(self.head, LinearHead):
            return True
        context = getattr(self.head, "context", None)
        return bool(getattr(context, "class_specific", False))


def build_classifier(
    backbone: Backbone,
    class_names: Sequence[str],
    prompt: PromptConfig | None,
    head: HeadConfig,
) -> PromptedClassifier:
    """A fresh classifier over ``class_names`` with the prompt family ``prompt`` (None: none).

    ``prompt.head`` (if set) overrides ``head.kind``. Pixel and token prompts work with either
    head; a text prompt (CoOp) is the zero-shot head's class prompts, so it needs that head.
    """
    from vpt_robust.prompts import PromptTarget, build_prompt, prompt_place

    if not class_names:
        raise ValueError("class_names is empty")
    prompt = prompt or PromptConfig(kind="none")
    head_kind = prompt.head_kind(head.kind)
    target = PromptTarget.of(backbone, class_names)
    placed: dict[str, nn.Module] = {}
    for kind, args in prompt.parts():
        place = prompt_place(kind)
        if place in placed:
            raise ValueError(
                f"prompt.kind {prompt.kind!r}: at most one {place} prompt per classifier "
                f"({placed[place].kind!r} and {kind!r})"
            )
        placed[place] = build_prompt(kind, args, target)
    device = backbone.mean.device
    if "text" in placed:
        if head_kind != "zero_shot":
            raise ValueError(
                f"prompt.kind {prompt.kind!r}: a text prompt (CoOp) is the zero-shot head's "
                "class prompts; it cannot be combined with a linear head"
            )
        if not backbone.has_text:
            raise BackboneError("a text prompt (CoOp) needs a backbone with a text tower")
        head_module: nn.Module = ContextTextHead(backbone, placed["text"].to(device))
    elif head_kind == "linear":
        head_module = LinearHead(backbone.feature_dim, len(class_names))
    else:
        head_module = zero_shot_head(backbone, class_names, head.templates)
    model = PromptedClassifier(
        backbone, head_module, pixel_prompt=placed.get("pixel"), token_prompt=placed.get("tokens")
    )
    model.spec = {
        "prompt": prompt.model_dump(mode="json"),
        "head": head.model_copy(update={"kind": head_kind}).model_dump(mode="json"),
    }
    model.class_names = tuple(class_names)
    return model.to(device)
