"""Pixel-space prompts: a learned frame around the image (padding prompt, EVP).

A pixel prompt is an image-to-image function. Its ``space`` says where it acts: ``"normalized"``
(on the model's normalised input, as Bahng et al.'s padding prompt) or ``"raw"`` (on the [0,1]
image at the model's size, before normalisation, as EVP). The classifier applies it there.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vpt_robust.prompts.registry import PromptArgs, PromptTarget, register_prompt


def default_pad(image_size: int) -> int:
    """The papers' 30 px frame on 224 px images, scaled to ``image_size`` (at least 1 px)."""
    return max(1, round(image_size * 30 / 224))


class BorderPrompt(nn.Module):
    """Learned values on a frame of width ``pad_size`` around an ``image_size`` square, stored
    as four strips (top, bottom, left, right) so that only the frame's values are parameters."""

    place = "pixel"
    space: Literal["raw", "normalized"] = "normalized"

    def __init__(self, image_size: int, pad_size: int, init: str) -> None:
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

    @property
    def inner_size(self) -> int:
        return self.image_size - 2 * self.pad_size

    def frame(self) -> torch.Tensor:
        """The full (1, 3, S, S) prompt, zero in the centre."""
        inner = self.inner_size
        centre = self.pad_up.new_zeros(1, 3, inner, inner)
        middle = torch.cat([self.pad_left, centre, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def _check(self, images: torch.Tensor) -> None:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size} px images, "
                f"got {tuple(images.shape[-2:])}"
            )


class PaddingPrompt(BorderPrompt):
    """A learned frame of width ``pad_size`` added around the image (Bahng et al., 2022).

    The prompt is added to the normalised image, as in the paper's code; the centre is left
    untouched. On 224 px with ``pad_size=30`` it has 69,840 values.
    """

    space = "normalized"

    def __init__(self, image_size: int, pad_size: int, init: str = "randn") -> None:
        super().__init__(image_size, pad_size, init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return images + self.frame().to(images.dtype)


class EVPPrompt(BorderPrompt):
    """Enhanced visual prompting (Wu et al., 2022; UCSC-VLAA/EVP ``main.py``).

    The [0,1] image is shrunk to ``image_size - 2 * pad_size`` (164 of 224 px), zero-padded back
    to ``image_size``, and a learned perturbation is added; it is zero-initialised and lives only
    on the border (69,840 values on 224 px). It acts before normalisation, in pixel units.

    Input diversity, in training only: a random horizontal flip and a random zoom-and-crop of the
    image (zoom in [1, ``max_zoom``], crop position uniform), sampled per image. The official
    code applies torchvision's flip + Resize(164) + RandomCrop(164), which on non-square photos
    crops along the longer side; our images are square, so a small random zoom stands in for it.
    Evaluation uses the plain shrink. Both resample bilinearly through the same sampling grid,
    so at zoom 1 without flip training and evaluation see the same image.

    EVP's update rule (normalised gradient, no momentum) is an optimiser option:
    ``train.optimizer: normalized_sgd`` (``vpt_robust/methods/optim.py``). The official code
    normalises the gradient of the whole 224 x 224 perturbation and then masks it to the border;
    ours normalises the border's gradient (the centre is not a parameter here).
    """

    space = "raw"

    def __init__(
        self, image_size: int, pad_size: int, diversity: bool = True, max_zoom: float = 1.125
    ) -> None:
        super().__init__(image_size, pad_size, "zeros")
        if max_zoom < 1:
            raise ValueError(f"prompt.max_zoom: {max_zoom} must be >= 1")
        self.diversity = diversity
        self.max_zoom = max_zoom

    def _grid(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        batch = images.shape[0]
        theta = images.new_zeros(batch, 2, 3, dtype=torch.float32)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        if augment:
            # One draw of 4 numbers per image: flip, zoom, x and y offset.
            r = torch.rand(batch, 4, device=images.device)
            scale = 1.0 / (1.0 + (self.max_zoom - 1.0) * r[:, 1])
            room = 1.0 - scale
            flip = torch.where(r[:, 0] < 0.5, -1.0, 1.0)
            theta[:, 0, 0] = scale * flip
            theta[:, 1, 1] = scale
            theta[:, 0, 2] = room * (2 * r[:, 2] - 1)
            theta[:, 1, 2] = room * (2 * r[:, 3] - 1)
        size = (batch, images.shape[1], self.inner_size, self.inner_size)
        return F.affine_grid(theta, list(size), align_corners=False)

    def shrink(self, images: torch.Tensor) -> torch.Tensor:
        """The image resampled to the inner size (with input diversity when training)."""
        grid = self._grid(images, self.training and self.diversity)
        return F.grid_sample(
            images,
            grid.to(images.dtype),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        p = self.pad_size
        framed = F.pad(self.shrink(images), (p, p, p, p), value=0.0)
        return framed + self.frame().to(images.dtype)


class PaddingArgs(PromptArgs):
    pad_size: int | None = Field(None, ge=1)
    init: Literal["randn", "zeros"] = "randn"


class EVPArgs(PromptArgs):
    pad_size: int | None = Field(None, ge=1)
    diversity: bool = True
    max_zoom: float = Field(1.125, ge=1)


@register_prompt("padding", PaddingArgs, place="pixel")
def _padding(args: PaddingArgs, target: PromptTarget) -> nn.Module:
    size = target.image_size
    return PaddingPrompt(size, args.pad_size or default_pad(size), init=args.init)


@register_prompt("evp", EVPArgs, place="pixel")
def _evp(args: EVPArgs, target: PromptTarget) -> nn.Module:
    size = target.image_size
    return EVPPrompt(
        size, args.pad_size or default_pad(size), diversity=args.diversity, max_zoom=args.max_zoom
    )
