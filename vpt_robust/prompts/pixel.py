"""Pixel-space prompts: learned perturbations added to the (normalised) image."""

from __future__ import annotations

import torch
from torch import nn


class PaddingPrompt(nn.Module):
    """A learned frame of width ``pad_size`` added around the image (Bahng et al., 2022).

    The prompt is added to the normalised image, as in the paper's code; the centre is left
    untouched. On 224 px with ``pad_size=30`` it has 69,840 values.
    """

    place = "pixel"

    def __init__(self, image_size: int, pad_size: int, init: str = "randn") -> None:
        super().__init__()
        if not 0 < 2 * pad_size < image_size:
            raise ValueError(
                f"prompt.pad_size: {pad_size} must be > 0 and leave a centre in a "
                f"{image_size} px image (2 * pad_size < image_size)"
            )
        if init not in ("randn", "zeros"):
            raise ValueError(f"prompt.init: {init!r} is not one of 'randn', 'zeros'")
        self.image_size = image_size
        self.pad_size = pad_size
        inner = image_size - 2 * pad_size
        make = torch.randn if init == "randn" else torch.zeros
        self.pad_up = nn.Parameter(make(1, 3, pad_size, image_size))
        self.pad_down = nn.Parameter(make(1, 3, pad_size, image_size))
        self.pad_left = nn.Parameter(make(1, 3, inner, pad_size))
        self.pad_right = nn.Parameter(make(1, 3, inner, pad_size))

    def frame(self) -> torch.Tensor:
        """The full (1, 3, S, S) prompt, zero in the centre."""
        inner = self.image_size - 2 * self.pad_size
        centre = self.pad_up.new_zeros(1, 3, inner, inner)
        middle = torch.cat([self.pad_left, centre, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"PaddingPrompt was built for {self.image_size} px images, "
                f"got {tuple(images.shape[-2:])}"
            )
        return images + self.frame().to(images.dtype)
