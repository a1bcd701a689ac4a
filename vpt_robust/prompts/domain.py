"""Domain prompts for continual test-time adaptation (VDP, Gan et al., AAAI 2023).

A domain prompt is a learned additive ring of pixels on the [0,1] image: the pixels at distance
``inset .. inset + width - 1`` from the border get ``x + delta`` (then clamped to [0, 1]); the
rest of the image is untouched. VDP places a domain-agnostic prompt (DAP) on the outer ring and
a domain-specific prompt (DSP) on the ring just inside it, so each covers a small part of the
image (a 1 px ring is 12% of a 32 px image) and the two never overlap. Only the ring's values are
parameters; zero init, so an untrained prompt leaves the image (and the model's output) exactly
as it was. Registered as the pixel family ``domain`` (``space="raw"``: it acts on the [0,1]
image at the size it is built for).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vpt_robust.prompts.registry import PromptArgs, PromptTarget, register_prompt


def ring_indices(image_size: int, width: int, inset: int = 0) -> torch.Tensor:
    """Flat indices (row * size + col) of the pixels at border distance inset..inset+width-1."""
    if width < 1 or inset < 0 or 2 * (inset + width) >= image_size:
        raise ValueError(
            f"domain prompt: width {width} and inset {inset} must leave a centre in a "
            f"{image_size} px image (width >= 1, inset >= 0, 2 * (inset + width) < size)"
        )
    r = torch.arange(image_size)
    dist = torch.minimum(
        torch.minimum(r.view(-1, 1), r.view(1, -1)),
        torch.minimum(image_size - 1 - r.view(-1, 1), image_size - 1 - r.view(1, -1)),
    )
    ring = (dist >= inset) & (dist < inset + width)
    return ring.flatten().nonzero().flatten()


class DomainPrompt(nn.Module):
    """A learned additive ring of ``width`` px, ``inset`` px from the border of a square image."""

    place = "pixel"
    space = "raw"

    def __init__(self, image_size: int, width: int = 1, inset: int = 0) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.width = int(width)
        self.inset = int(inset)
        index = ring_indices(self.image_size, self.width, self.inset)
        self.register_buffer("index", index, persistent=False)
        self.delta = nn.Parameter(torch.zeros(3, index.numel()))

    def prompt(self) -> torch.Tensor:
        """The full (1, 3, S, S) additive prompt, zero off the ring."""
        s = self.image_size
        full = self.delta.new_zeros(3, s * s).index_copy(1, self.index, self.delta)
        return full.view(1, 3, s, s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"DomainPrompt was built for {self.image_size} px images, "
                f"got {tuple(images.shape[-2:])}"
            )
        return (images + self.prompt().to(images.dtype)).clamp(0.0, 1.0)


class DomainArgs(PromptArgs):
    width: int = Field(1, ge=1)
    inset: int = Field(0, ge=0)


@register_prompt("domain", DomainArgs, place="pixel")
def _domain(args: DomainArgs, target: PromptTarget) -> nn.Module:
    return DomainPrompt(target.image_size, args.width, args.inset)
