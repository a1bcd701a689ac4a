"""The one prompted forward of a ViT image tower: extra tokens in the transformer's sequence.

Supported towers: open_clip's ``VisionTransformer`` (CLIP ViT-B/32 and friends), timm's
``VisionTransformer``, and open_clip's ``TimmModel`` wrapping a timm ``VisionTransformer`` (the
embedded tiny CLIP, whose tokens come from a convolutional stem). The forward re-runs the tower's
own pieces (its embedding, its blocks, its final norm, pooling and projection) and only changes
the token sequence between them, so with no prompt tokens it reproduces the tower's output
exactly.

Where the prompts go (VPT, Jia et al. 2022; KMnP/vpt ``src/models/vit_prompt/vit.py``):

- ``[CLS, P, patches]``: after all prefix tokens (CLS and any register tokens). The prompts get
  no position embedding; since attention is permutation-equivariant, appending them after the
  patches (TeCoA) gives the same features. They enter as the input of the first block, i.e. after
  the tower's embedding step including its pre-norm (``ln_pre`` in open_clip, ``norm_pre`` in
  timm); KMnP's ViT has no pre-norm, so this is our choice for towers that do: prompts then live
  in the same space as deep prompts, the residual stream.
- Deep prompts: before every block after the first, the prompt slots are replaced by that
  layer's fresh prompts; a prompt module says which layers have fresh prompts.
- The prompt tokens are dropped again before the final norm and pooling, so a tower that
  average-pools its patch tokens pools the same tokens as without prompts (class-token towers
  are unaffected either way: the prompts act through attention only).
- Readout: a prompt with ``readout = "prompts"`` (L2P's ``prompt`` head type) makes the feature
  the mean of the prompt tokens' outputs after the tower's final per-token norm, then the
  tower's own projection where it has one (open_clip ``proj``; timm ``fc_norm`` and, for
  ``TimmModel``, its projection head), so the feature keeps the pooled feature's dimension.
  Any other prompt (``readout`` absent or ``"pool"``) keeps the tower's pooling.
- Input-dependent prompts (L2P's pool) choose their tokens from a query before the forward:
  ``PromptedClassifier`` calls their ``prepare(query)``; this module only asks for tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class PromptedForwardError(TypeError):
    """The image tower is not a ViT this module knows how to prompt."""


class TokenPrompt(Protocol):
    """What the prompted forward needs from a token prompt module."""

    length: int

    def layer_tokens(self, layer: int, batch: int) -> torch.Tensor | None:
        """Fresh prompt tokens ``(batch, length, width)`` entering block ``layer``, or None to
        keep the current prompt slots (layer 0 must return tokens)."""


def prompt_readout(prompt: TokenPrompt) -> str:
    """``"prompts"`` (mean of the prompt tokens' outputs) or ``"pool"`` (the tower's pooling)."""
    readout = getattr(prompt, "readout", "pool")
    if readout not in ("pool", "prompts"):
        raise ValueError(f"token prompt: readout {readout!r} is not one of 'pool', 'prompts'")
    return readout


@dataclass(frozen=True)
class TokenGeometry:
    """Shape facts of a ViT tower that token prompts are built for."""

    width: int
    num_layers: int
    patch_size: int
    num_prefix_tokens: int
    num_patches: int


def _tower(image_model: nn.Module) -> tuple[str, nn.Module]:
    """``("open_clip" | "timm", the module holding the blocks)``."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer as OpenClipViT
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(image_model, OpenClipViT):
        return "open_clip", image_model
    if isinstance(image_model, TimmViT):
        return "timm", image_model
    if isinstance(image_model, TimmModel) and isinstance(image_model.trunk, TimmViT):
        return "timm", image_model.trunk
    raise PromptedForwardError(
        f"token prompts need a ViT image tower (open_clip VisionTransformer, timm "
        f"VisionTransformer, or open_clip TimmModel over one); got {type(image_model).__name__}"
        + (f" over {type(image_model.trunk).__name__}" if hasattr(image_model, "trunk") else "")
    )


def vit_geometry(image_model: nn.Module) -> TokenGeometry:
    """Width, depth, patch size (a conv stem's stride), prefix tokens and patch count of a tower."""
    family, tower = _tower(image_model)
    if family == "open_clip":
        patch = tower.conv1.kernel_size[0]
        grid = tower.grid_size
        return TokenGeometry(
            width=int(tower.class_embedding.shape[-1]),
            num_layers=len(tower.transformer.resblocks),
            patch_size=int(patch),
            num_prefix_tokens=1,
            num_patches=int(grid[0] * grid[1]),
        )
    ps = tower.patch_embed.patch_size
    return TokenGeometry(
        width=int(tower.embed_dim),
        num_layers=len(tower.blocks),
        patch_size=int(ps[0] if isinstance(ps, tuple | list) else ps),
        num_prefix_tokens=int(tower.num_prefix_tokens),
        num_patches=int(tower.patch_embed.num_patches),
    )


def _insert(x: torch.Tensor, p: torch.Tensor, n_prefix: int) -> torch.Tensor:
    return torch.cat([x[:, :n_prefix], p.to(x.dtype), x[:, n_prefix:]], dim=1)


def _replace(x: torch.Tensor, p: torch.Tensor, n_prefix: int) -> torch.Tensor:
    n = p.shape[1]
    return torch.cat([x[:, :n_prefix], p.to(x.dtype), x[:, n_prefix + n :]], dim=1)


def _strip(x: torch.Tensor, n: int, n_prefix: int) -> torch.Tensor:
    if n == 0:
        return x
    return torch.cat([x[:, :n_prefix], x[:, n_prefix + n :]], dim=1)


def _check_tokens(p: torch.Tensor | None, layer: int, batch: int, length: int, width: int) -> None:
    if p is None:
        if layer == 0:
            raise ValueError("token prompt: layer 0 must provide prompt tokens")
        return
    if p.shape != (batch, length, width):
        raise ValueError(
            f"token prompt: layer {layer} gave tokens of shape {tuple(p.shape)}, "
            f"expected {(batch, length, width)}"
        )


def _call_block(blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return blk(h)


def run_prompted_blocks(
    blocks: list[nn.Module] | nn.ModuleList,
    x: torch.Tensor,
    prompt: TokenPrompt,
    n_prefix: int,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call_block,
    *,
    keep_prompts: bool = False,
) -> torch.Tensor:
    """Insert the prompt before block 0, replace its slots where a layer has fresh tokens, run
    every block, and return the sequence without the prompt tokens (with them, at positions
    ``n_prefix .. n_prefix + length - 1``, if ``keep_prompts``)."""
    batch, _, width = x.shape
    for i, blk in enumerate(blocks):
        p = prompt.layer_tokens(i, batch)
        _check_tokens(p, i, batch, prompt.length, width)
        if i == 0:
            x = _insert(x, p, n_prefix)
        elif p is not None:
            x = _replace(x, p, n_prefix)
        x = call(blk, x)
    return x if keep_prompts else _strip(x, prompt.length, n_prefix)


def _prompt_slots(x: torch.Tensor, prompt: TokenPrompt, n_prefix: int) -> torch.Tensor:
    return x[:, n_prefix : n_prefix + prompt.length]


def _open_clip_features(tower: nn.Module, x: torch.Tensor, prompt: TokenPrompt) -> torch.Tensor:
    x = tower._embeds(x)
    batch_first = getattr(tower.transformer, "batch_first", True)

    def call(blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if batch_first:
            return blk(h, attn_mask=None)
        return blk(h.transpose(0, 1), attn_mask=None).transpose(0, 1)

    if prompt_readout(prompt) == "prompts":
        if tower.attn_pool is not None:
            raise PromptedForwardError(
                "readout 'prompts' needs a tower without attention pooling (open_clip attn_pool)"
            )
        x = run_prompted_blocks(tower.transformer.resblocks, x, prompt, 1, call, keep_prompts=True)
        pooled = tower.ln_post(_prompt_slots(x, prompt, 1)).mean(dim=1)
    else:
        x = run_prompted_blocks(tower.transformer.resblocks, x, prompt, 1, call)
        pooled, _ = tower._pool(x)
    if tower.proj is not None:
        pooled = pooled @ tower.proj
    return pooled


def _timm_tokens(
    trunk: nn.Module, x: torch.Tensor, prompt: TokenPrompt, keep_prompts: bool = False
) -> torch.Tensor:
    """timm ``forward_features`` with prompts: the final-normed token sequence."""
    x = trunk.patch_embed(x)
    x = trunk._pos_embed(x)
    x = trunk.patch_drop(x)
    x = trunk.norm_pre(x)
    x = run_prompted_blocks(
        trunk.blocks, x, prompt, trunk.num_prefix_tokens, keep_prompts=keep_prompts
    )
    return trunk.norm(x)


def _timm_prompt_head(trunk: nn.Module, tokens: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    """timm ``forward_head`` with the mean of the prompt tokens in place of the pooling."""
    x = trunk.fc_norm(tokens.mean(dim=1))
    x = trunk.head_drop(x)
    return x if pre_logits else trunk.head(x)


def prompted_image_features(
    image_model: nn.Module, x: torch.Tensor, prompt: TokenPrompt, *, pre_logits: bool = True
) -> torch.Tensor:
    """Image features of normalised images ``x`` with ``prompt``'s tokens in the sequence.

    Returns what the tower's own forward returns: open_clip towers (including ``TimmModel``)
    their projected embedding; a bare timm ViT its pooled pre-logits features (``pre_logits``,
    as the backbone uses it) or its head's output.
    """
    from open_clip.timm_model import TimmModel

    family, tower = _tower(image_model)
    if family == "open_clip":
        return _open_clip_features(tower, x, prompt)
    if prompt_readout(prompt) == "prompts":
        tokens = _timm_tokens(tower, x, prompt, keep_prompts=True)
        slots = _prompt_slots(tokens, prompt, tower.num_prefix_tokens)
        if isinstance(image_model, TimmModel):
            return image_model.head(_timm_prompt_head(tower, slots, pre_logits=False))
        return _timm_prompt_head(tower, slots, pre_logits)
    tokens = _timm_tokens(tower, x, prompt)
    if isinstance(image_model, TimmModel):
        return image_model.head(tower.forward_head(tokens))
    return tower.forward_head(tokens, pre_logits=pre_logits)
