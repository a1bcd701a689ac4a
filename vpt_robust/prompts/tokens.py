"""Token prompts: learned tokens in the ViT's sequence (VPT shallow / deep, Jia et al. 2022).

The forward that inserts them lives in ``vpt_robust/models/prompted_vit.py`` (one
implementation for open_clip and timm ViTs); this module only holds the learned tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vpt_robust.prompts.registry import PromptArgs, PromptTarget, register_prompt


class VPTPrompt(nn.Module):
    """``length`` learned tokens of width ``width`` (KMnP/vpt ``src/models/vit_prompt/vit.py``).

    ``depth="shallow"``: one set of tokens, inserted before the first block as
    ``[CLS, P, patches]`` (no position embedding). ``depth="deep"``: a fresh set for every block;
    before each block after the first the prompt slots are replaced by that block's set.
    Where in the sequence the tokens sit does not matter: they carry no position embedding and
    the encoder's attention is permutation-equivariant, so TeCoA's token prompt (appended after
    the patches) is this same prompt.

    Initialisation is VPT's: U(-v, v) with v = sqrt(6 / (3 * patch^2 + width)) (Xavier-uniform
    for a patch projection); ``patch_size`` is the tower's patch size, or for a convolutional
    stem its total stride, as ``vit_geometry`` reads it: 8 px on the embedded tiny CLIP (a
    stride-1 conv, two stride-2 convs and a stride-2 projection; 4 x 4 = 16 tokens at 32 px).
    Prompt dropout applies in training (VPT uses 0.1 for deep prompts; ``dropout=None`` picks
    0.1 for deep and 0 for shallow).
    """

    place = "tokens"

    def __init__(
        self,
        width: int,
        num_layers: int,
        patch_size: int,
        length: int = 10,
        depth: Literal["shallow", "deep"] = "shallow",
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if depth not in ("shallow", "deep"):
            raise ValueError(f"prompt.depth: {depth!r} is not one of 'shallow', 'deep'")
        if length < 0 or width < 1 or num_layers < 1 or patch_size < 1:
            raise ValueError(
                f"VPTPrompt: length {length} must be >= 0 and width {width}, num_layers "
                f"{num_layers}, patch_size {patch_size} >= 1"
            )
        self.length = length
        self.depth = depth
        self.width = width
        rate = (0.1 if depth == "deep" else 0.0) if dropout is None else dropout
        if not 0 <= rate < 1:
            raise ValueError(f"prompt.dropout: {rate} must be in [0, 1)")
        self.dropout = nn.Dropout(rate)
        layers = num_layers if depth == "deep" else 1
        bound = math.sqrt(6.0 / (3 * patch_size**2 + width))
        self.tokens = nn.Parameter(torch.empty(layers, length, width).uniform_(-bound, bound))

    @property
    def num_prompt_layers(self) -> int:
        return int(self.tokens.shape[0])

    def layer_tokens(self, layer: int, batch: int) -> torch.Tensor | None:
        """Tokens ``(batch, length, width)`` entering block ``layer``; None where the slots keep
        what the previous block made of them (every layer after the first, for shallow)."""
        if layer >= self.num_prompt_layers:
            return None
        return self.dropout(self.tokens[layer].expand(batch, -1, -1))


class VPTArgs(PromptArgs):
    length: int = Field(10, ge=0)
    depth: Literal["shallow", "deep"] = "shallow"
    dropout: float | None = Field(None, ge=0, lt=1)


@register_prompt("vpt", VPTArgs, place="tokens")
def _vpt(args: VPTArgs, target: PromptTarget) -> nn.Module:
    geo = target.require_backbone("vpt").token_geometry
    return VPTPrompt(
        geo.width,
        geo.num_layers,
        geo.patch_size,
        length=args.length,
        depth=args.depth,
        dropout=args.dropout,
    )
