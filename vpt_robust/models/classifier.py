"""The classifier every stage sees: frozen backbone + prompts + head, taking [0,1] images."""

from __future__ import annotations

import torch
from torch import nn

from vpt_robust.models.backbone import Backbone


class PromptedClassifier(nn.Module):
    """``logits = head(encode_image(pixel_prompt(normalize(images))))``.

    Training, attacks and evaluation only call ``forward``; they never need to know which prompts
    are plugged in. Only the prompt and (for a linear head) the head hold trainable parameters.
    """

    def __init__(
        self, backbone: Backbone, head: nn.Module, pixel_prompt: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pixel_prompt = pixel_prompt

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.backbone.normalize(images)
        if self.pixel_prompt is not None:
            x = self.pixel_prompt(x)
        return self.head(self.backbone.encode_image(x))

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
